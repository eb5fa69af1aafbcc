"""Start-up states: a model that cannot load answers 503 in OpenAI's shape, never a traceback."""

from __future__ import annotations

import httpx

from tests.conftest import start_server


def test_model_that_fails_to_load_gives_503(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    server = start_server(tmp_path, {"LLM_MODEL": str(broken)}, wait_ready=False)
    try:
        for _ in range(100):
            health = httpx.get(server.base_url + "/health").json()
            if health["status"] == "error":
                break
        assert health["status"] == "error"
        assert health["models"][0]["state"] == "failed"
        response = httpx.post(
            server.v1 + "/chat/completions",
            json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]},
        )
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
