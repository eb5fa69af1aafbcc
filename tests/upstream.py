"""A small misbehaving OpenAI-compatible server for routing tests, served by uvicorn on loopback.

Each target in a test config uses its own base URL, `http://127.0.0.1:PORT/<name>/v1`; what `<name>`
does is its mode: the name's last dash-separated word (`a-500` answers 500), which tests may change while
it runs (PUT /control/<name>). Modes:
  ok       answers like OpenAI (a stream of a role chunk and 5 content chunks, then a usage chunk if
           stream_options.include_usage asks for it; or one body), with content "from <name>"
  nousage  as ok, but never sends usage in streams (as some providers do)
  tools    calls the request's first tool, with the whole request it received as the arguments
  500      OpenAI-shaped 500;  429: 429 with Retry-After: 1;  400: a request error
  stall    sends nothing for 60 s
  cut3     streams 3 chunks, then drops the connection
  fail2    500 for the first 2 requests, then ok
GET /control/<name> says how many requests <name> received; `received[name]` holds the last body.
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
        self.received: dict[str, dict] = {}
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
        body = self.received[name] = await request.json()
        if mode == "fail2":
            mode = "500" if self.hits[name] <= 2 else "ok"
        if mode in ERRORS:
            status, headers = ERRORS[mode]
            return JSONResponse(_error(status), status_code=status, headers=headers)
        if mode == "stall":
            await asyncio.sleep(60)
        if body.get("stream"):
            return StreamingResponse(_stream(name, mode, body), media_type="text/event-stream")
        return JSONResponse(_completion(name, _tool_call(body) if mode == "tools" else None))


ERRORS = {"500": (500, {}), "429": (429, {"Retry-After": "1"}), "400": (400, {})}
WORDS = ["from", " ", "<name>", " ", "upstream"]
STREAM_USAGE = {"prompt_tokens": 3, "completion_tokens": len(WORDS), "total_tokens": 3 + len(WORDS)}


def _error(status: int) -> dict:
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {"error": {"message": f"upstream says {status}", "type": kind, "param": None, "code": f"upstream_{status}"}}


def _tool_call(body: dict) -> dict:
    tool = body["tools"][0]["function"]["name"]
    return {"id": "call_echo", "type": "function", "function": {"name": tool, "arguments": json.dumps(body)}}


def _completion(name: str, tool_call: dict | None) -> dict:
    message, finish_reason = {"role": "assistant", "content": f"from {name}"}, "stop"
    if tool_call:
        message, finish_reason = {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"
    return {
        "id": "chatcmpl-upstream", "object": "chat.completion", "created": 0, "model": name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }  # fmt: skip


def _chunk(name: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 0, "model": name,
             "choices": choices, **({"usage": usage} if usage else {})}  # fmt: skip
    return f"data: {json.dumps(chunk)}\n\n"


def _deltas(name: str, mode: str, body: dict) -> list[tuple[dict, str | None]]:
    """The stream's deltas with their finish reasons; the role comes first, as from OpenAI."""
    if mode == "tools":
        return _tool_call_deltas(_tool_call(body))
    words = [name if word == "<name>" else word for word in WORDS]
    return [({"role": "assistant", "content": ""}, None), *(({"content": word}, None) for word in words)]


def _tool_call_deltas(call: dict) -> list[tuple[dict, str | None]]:
    """A tool call as OpenAI streams it: its id and name first, then the arguments in pieces."""
    arguments = call["function"]["arguments"]
    opening = {**call, "index": 0, "function": {**call["function"], "arguments": ""}}
    pieces = [arguments[i : i + 40] for i in range(0, len(arguments), 40)]
    rest = [({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None) for piece in pieces]
    return [({"role": "assistant", "content": None, "tool_calls": [opening]}, None), *rest, ({}, "tool_calls")]


async def _stream(name: str, mode: str, body: dict):
    for i, (delta, finish_reason) in enumerate(_deltas(name, mode, body)):
        if mode == "cut3" and i == 3:
            raise ConnectionResetError("cut on purpose")  # uvicorn drops the connection mid-body
        yield _chunk(name, delta, finish_reason)
        await asyncio.sleep(0.01)
    if (body.get("stream_options") or {}).get("include_usage") and mode != "nousage":
        yield _chunk(name, {}, usage=STREAM_USAGE)
    yield "data: [DONE]\n\n"
