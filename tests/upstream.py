"""A small misbehaving OpenAI-compatible server for routing tests, served by uvicorn on loopback.

Each target in a test config uses its own base URL, `http://127.0.0.1:PORT/<name>/v1`; what `<name>`
does is its mode: the name's last dash-separated word (`a-500` answers 500), which tests may change while
it runs (PUT /control/<name>). Modes:
  ok       answers like OpenAI (a stream of 5 chunks, or one body), with content "from <name>"
  500      OpenAI-shaped 500;  429: 429 with Retry-After: 1;  400: a request error
  stall    sends nothing for 60 s
  cut3     streams 3 chunks, then drops the connection
  fail2    500 for the first 2 requests, then ok
GET /control/<name> says how many requests <name> received.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class Upstream:
    def __init__(self, port: int):
        self.port = port
        self.modes: dict[str, str] = {}
        self.hits: collections.Counter = collections.Counter()
        routes = [
            Route("/control/{name}", self._control, methods=["GET", "PUT"]),
            Route("/{name}/v1/{endpoint:path}", self._serve, methods=["POST"]),
        ]
        config = uvicorn.Config(Starlette(routes=routes), port=port, log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def base_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/v1"

    def start(self) -> "Upstream":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _control(self, request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "PUT":
            self.modes[name] = (await request.json())["mode"]
        return JSONResponse({"mode": self._mode(name), "hits": self.hits[name]})

    def _mode(self, name: str) -> str:
        return self.modes.get(name, name.rsplit("-", 1)[-1])

    async def _serve(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.hits[name] += 1
        mode = self._mode(name)
        body = await request.json()
        if mode == "fail2":
            mode = "500" if self.hits[name] <= 2 else "ok"
        if mode in ERRORS:
            status, headers = ERRORS[mode]
            return JSONResponse(_error(status), status_code=status, headers=headers)
        if mode == "stall":
            await asyncio.sleep(60)
        if body.get("stream"):
            chunks = _chunks(name, cut_after=3 if mode == "cut3" else None)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return JSONResponse(_completion(name))


ERRORS = {"500": (500, {}), "429": (429, {"Retry-After": "1"}), "400": (400, {})}


def _error(status: int) -> dict:
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {"error": {"message": f"upstream says {status}", "type": kind, "param": None, "code": f"upstream_{status}"}}


def _completion(name: str) -> dict:
    return {
        "id": "chatcmpl-upstream", "object": "chat.completion", "created": 0, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {name}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }  # fmt: skip


async def _chunks(name: str, cut_after: int | None):
    words = ["from", " ", name, " ", "upstream"]
    for i, word in enumerate(words):
        if cut_after is not None and i == cut_after:
            raise ConnectionResetError("cut on purpose")  # uvicorn drops the connection mid-body
        chunk = {
            "id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 0, "model": name,
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
        }  # fmt: skip
        yield f"data: {json.dumps(chunk)}\n\n"
        await asyncio.sleep(0.01)
    yield "data: [DONE]\n\n"
