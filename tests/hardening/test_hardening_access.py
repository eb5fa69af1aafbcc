"""Hardening of access and token limits, against real gateways, a real misbehaving upstream and a real file server.

Token limits charge what a request used however it ended (finished, abandoned by its client, or cut by its
deadline), and a request reserves its maximum when admitted, so concurrent requests cannot all slip under a
limit at once. Loading and unloading need an admin key; a provider's refusal of the gateway's own key is a 502
that says nothing of the provider's message; /health shows providers' URLs to an admin key only; a model URL
cannot make the download write outside the models folder.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import MODEL, start_server, wait_for
from tests.lifecycle.test_model_lifecycle import SMALL, model_file

USER_KEY = "sk-user-key"
CONFIG_ADMIN_KEY = "sk-config-admin"
ENV_ADMIN_KEY = "sk-env-admin"
PROVIDER_SECRET = "sk-abc***xyz"
PROVIDER_MESSAGE = f"Incorrect API key provided: {PROVIDER_SECRET}. You can find your API key at the dashboard."
# key -> its tokens per minute. The chat template alone makes SmolLM2's prompts longer than 20 tokens.
TOKENS_PER_MINUTE = {"sk-tpm-stream-left": 40, "sk-tpm-answer-left": 20, "sk-tpm-deadline": 20,
                     "sk-tpm-remote-left": 100, "sk-tpm-concurrent": 1500}  # fmt: skip
LONG = {"max_tokens": 2000, "ignore_eos": True}
HELLO = [{"role": "user", "content": "Tell a long story."}]


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def serve(handler: type[QuietHandler]) -> http.server.ThreadingHTTPServer:
    """A real HTTP server on a loopback port, in a thread; `server.root` is its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.root = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class RefusingProvider(QuietHandler):
    """An OpenAI-compatible provider that refuses the gateway's key: `/<status>/v1/...` answers `status` (401 or
    403) with an OpenAI-shaped error quoting a masked piece of the key, as OpenAI does."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        error = {"message": PROVIDER_MESSAGE, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
        self.reply(int(self.path.split("/")[1]), json.dumps({"error": error}).encode())


@pytest.fixture(scope="module")
def provider():
    server = serve(RefusingProvider)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, upstream, provider):
    folder = tmp_path_factory.mktemp("guarded")
    config = {
        "targets": {
            "local": {"type": "local"},
            "stalling": {"type": "openai", "base_url": upstream.base_url("x-stall"), "model": "m"},
            "refusing-401": {"type": "openai", "base_url": provider.root + "/401/v1", "model": "m"},
            "refusing-403": {"type": "openai", "base_url": provider.root + "/403/v1", "model": "m"},
        },
        "models": {
            MODEL: {"targets": ["local"]},
            "stall-only": {"targets": ["stalling"]},
            "refused-401": {"targets": ["refusing-401"]},
            "refused-403": {"targets": ["refusing-403"]},
            "refused-then-local": {"targets": ["refusing-401", "local"]},
        },
        "api_keys": [{"key": USER_KEY, "name": "user"}, {"key": CONFIG_ADMIN_KEY, "name": "ops", "admin": True},
                     *({"key": key, "tokens_per_minute": limit} for key, limit in TOKENS_PER_MINUTE.items())],
    }  # fmt: skip
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
    server = start_server(folder, {"LLM_CONFIG": str(folder / "gateway.yaml"), "LLM_ADMIN_KEYS": ENV_ADMIN_KEY})
    yield server
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(server, key: str, model: str = MODEL, headers: dict | None = None, **body) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **body}
    return httpx.post(server.v1 + "/chat/completions", json=body, headers={**bearer(key), **(headers or {})},
                      timeout=60)  # fmt: skip


def access_line(server, request_id: str) -> dict:
    """The access-log line of a request: written after its tokens were charged, however it ended."""
    lines = wait_for(lambda: [line for line in server.access_log() if line.get("request_id") == request_id],
                     30, f"no access line for {request_id}")  # fmt: skip
    return lines[0]


def assert_out_of_tokens(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert int(response.headers["Retry-After"]) >= 1


def assert_health_responsive(server) -> None:
    started = time.monotonic()
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - started < 2


# ---- token limits: charged however a request ends, reserved while it runs --------------------------------------


def test_a_stream_its_client_leaves_is_charged(guarded):
    key, request_id = "sk-tpm-stream-left", uuid.uuid4().hex
    body = {"model": MODEL, "messages": HELLO, "stream": True, **LONG}
    headers = {**bearer(key), "x-request-id": request_id}
    with httpx.stream("POST", guarded.v1 + "/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events > TOKENS_PER_MINUTE[key]:
                break  # the client leaves mid-stream, past its key's limit
    line = access_line(guarded, request_id)
    assert line["completion_tokens"] >= TOKENS_PER_MINUTE[key] // 2  # the tokens sent before it left, at least
    assert_out_of_tokens(chat(guarded, key))  # uncharged, the key would still be at zero and get in
    assert_health_responsive(guarded)


def test_an_answer_its_client_gives_up_on_is_charged(guarded):
    key, request_id = "sk-tpm-answer-left", uuid.uuid4().hex
    body = {"model": MODEL, "messages": HELLO, **LONG}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection before the answer
        httpx.post(guarded.v1 + "/chat/completions", json=body, headers={**bearer(key), "x-request-id": request_id},
                   timeout=3)  # fmt: skip
    line = access_line(guarded, request_id)
    assert line["status"] == 499 and line["prompt_tokens"] > TOKENS_PER_MINUTE[key]
    assert_out_of_tokens(chat(guarded, key))


def test_a_request_cut_by_its_deadline_is_charged(guarded):
    key, request_id = "sk-tpm-deadline", uuid.uuid4().hex
    response = chat(guarded, key, headers={"x-request-timeout": "3", "x-request-id": request_id}, messages=HELLO,
                    **LONG)  # fmt: skip
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    line = access_line(guarded, request_id)
    assert line["prompt_tokens"] + line["completion_tokens"] > TOKENS_PER_MINUTE[key]
    assert_out_of_tokens(chat(guarded, key))


def test_a_remote_request_left_before_the_provider_answered_is_charged_its_maximum(guarded):
    key, request_id = "sk-tpm-remote-left", uuid.uuid4().hex
    body = {"model": "stall-only", "messages": HELLO, "max_tokens": 200, "stream": True}
    with pytest.raises(httpx.ReadTimeout):  # the provider says nothing; the client leaves
        httpx.post(guarded.v1 + "/chat/completions", json=body, headers={**bearer(key), "x-request-id": request_id},
                   timeout=2)  # fmt: skip
    line = access_line(guarded, request_id)
    # The provider may bill a full answer the gateway never saw: the request's maximum (200 + its prompt).
    assert line["status"] == 499 and line["prompt_tokens"] + line["completion_tokens"] == 0
    assert_out_of_tokens(chat(guarded, key, max_tokens=1))


def test_concurrent_requests_cannot_overshoot_the_limit(guarded):
    # Each request may use ~1,025 tokens (1,000 to generate, its ~100-byte body at 4 bytes a token): a key of
    # 1,500 tokens a minute admits one, and a second while what the first holds is under 1,500; no more.
    key, request_ids = "sk-tpm-concurrent", [uuid.uuid4().hex for _ in range(8)]

    def one(request_id: str) -> httpx.Response:  # a provider that stalls: all eight are in flight together
        headers = {"x-request-timeout": "4", "x-request-id": request_id}
        return chat(guarded, key, model="stall-only", headers=headers, max_tokens=1000)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, request_ids))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [429] * 6 + [504] * 2, [r.text for r in responses]
    for response in responses:
        if response.status_code == 429:
            assert_out_of_tokens(response)
    for request_id in request_ids:
        access_line(guarded, request_id)  # each one settled
    # Cut by the deadline before the provider told its usage, each of the two was charged its whole reservation.
    assert_out_of_tokens(chat(guarded, key, model="stall-only"))


# ---- provider auth failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["refused-401", "refused-403"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_provider_refusing_the_gateway_s_key_is_a_generic_502(guarded, model, stream):
    response = chat(guarded, USER_KEY, model=model, stream=stream)
    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_auth_failed")
    assert model.replace("refused", "refusing") in error["message"]
    for piece in ("Incorrect API key", "sk-abc", "xyz", "dashboard", "invalid_api_key"):
        assert piece not in response.text and piece not in guarded.log()


def test_a_provider_refusing_the_gateway_s_key_falls_back(guarded):
    response = chat(guarded, USER_KEY, model="refused-then-local")
    assert response.status_code == 200 and response.headers["x-llm-target"] == "local"


# ---- /health -------------------------------------------------------------------------------------------------


def test_health_shows_provider_urls_to_an_admin_key_only(guarded, upstream, provider):
    addresses = [f"127.0.0.1:{upstream.port}", provider.root.removeprefix("http://")]
    for headers in ({}, bearer(USER_KEY), bearer("sk-wrong")):
        response = httpx.get(guarded.base_url + "/health", headers=headers, timeout=10)
        assert response.status_code == 200  # open for probes
        assert "base_url" not in response.text and not any(a in response.text for a in addresses)
        assert response.json()["targets"]["stalling"]["state"] in ("ok", "cooling")
    for admin in (CONFIG_ADMIN_KEY, ENV_ADMIN_KEY):
        targets = httpx.get(guarded.base_url + "/health", headers=bearer(admin), timeout=10).json()["targets"]
        assert targets["stalling"]["base_url"] == upstream.base_url("x-stall")
        assert targets["refusing-401"]["base_url"] == provider.root + "/401/v1"
        assert "base_url" not in targets["local"]


# ---- admin scope -----------------------------------------------------------------------------------------------


def post(server, action: str, headers: dict) -> httpx.Response:
    return httpx.post(f"{server.v1}/models/{MODEL}/{action}", headers=headers, timeout=120)


def test_only_admin_keys_load_and_unload(guarded):
    for action in ("unload", "load"):
        response = post(guarded, action, bearer(USER_KEY))
        assert response.status_code == 403
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "insufficient_permissions")
        assert post(guarded, action, {}).status_code == 401
        assert post(guarded, action, bearer("sk-wrong")).status_code == 401
    assert guarded.health()["models"][0]["state"] == "ready"  # none of them unloaded it
    for admin in (CONFIG_ADMIN_KEY, ENV_ADMIN_KEY):  # admin: true in api_keys, and LLM_ADMIN_KEYS
        unloaded = post(guarded, "unload", bearer(admin))
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
        loaded = post(guarded, "load", bearer(admin))
        assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert chat(guarded, ENV_ADMIN_KEY).status_code == 200  # an admin key is a client key too


def test_admin_keys_alone_guard_only_load_and_unload(tmp_path):
    server = start_server(tmp_path, {"LLM_ADMIN_KEYS": ENV_ADMIN_KEY, **SMALL})
    try:
        response = httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": HELLO,
                              "max_tokens": 2}, timeout=60)  # fmt: skip
        assert response.status_code == 200  # the gateway stays open for clients
        assert post(server, "unload", {}).status_code == 401
        assert post(server, "unload", bearer("sk-wrong")).status_code == 401
        assert post(server, "unload", bearer(ENV_ADMIN_KEY)).json()["state"] == "unloaded"
    finally:
        server.stop()


# ---- downloads ---------------------------------------------------------------------------------------------------


def any_path_file_server(source: Path) -> http.server.ThreadingHTTPServer:
    """Serves one file at whatever path is asked; `server.paths` records the paths."""
    payload = source.read_bytes()
    paths: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self):
            paths.append(self.path)
            self.reply(200, payload)

    server = serve(Handler)
    server.paths = paths
    return server


@pytest.mark.parametrize("path", ["/x/%2F..%2F..%2Fevil.gguf", "/x/..%2F..%2Fevil.gguf", "/x/..%5C..%5Cevil.gguf"])
def test_a_model_url_cannot_write_outside_the_models_folder(tmp_path, path):
    files = any_path_file_server(model_file())
    models = tmp_path / "deep" / "er" / "models"
    server = start_server(tmp_path, {"LLM_MODEL_URL": files.root + path, "LLM_MODELS_DIR": str(models), **SMALL})
    try:
        assert files.paths == [path]  # fetched once, as given
        written = sorted(p for p in tmp_path.rglob("*evil*"))
        assert written == [models / "evil.gguf"]  # inside the models folder, under its plain name
        assert not Path("/evil.gguf").exists()
        assert chat(server, "any").status_code == 200  # served from that file
    finally:
        server.stop()
        files.shutdown()
