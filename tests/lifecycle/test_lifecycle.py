"""Start-up states: a model that cannot load answers 503 in OpenAI's shape, never a traceback."""

from __future__ import annotations

from tests.conftest import start_server, wait_for_state


def test_model_that_fails_to_load_gives_503(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    server = start_server(tmp_path, {"LLM_MODEL": str(broken)}, wait_ready=False)
    try:
        wait_for_state(server, "failed", "broken")
        health = server.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "error")
        ready = server.get("/ready")
        assert (ready.status_code, ready.json()) == (503, {"status": "failed", "model": "broken"})
        body = {"model": "broken", "messages": [{"role": "user", "content": "hi"}]}
        response = server.post("/v1/chat/completions", json=body)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_ready"
        assert "Retry-After" in response.headers
    finally:
        server.stop()


def test_missing_model_stops_start_up_with_a_clear_message(tmp_path):
    try:
        start_server(tmp_path, {"LLM_MODEL": "qwen2.5-3b-instruct"})
        raise AssertionError("the gateway should refuse to start without its model")
    except RuntimeError as error:
        assert "Qwen/Qwen2.5-3B-Instruct" in str(error)
