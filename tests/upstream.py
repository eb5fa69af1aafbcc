"""A small misbehaving provider for routing tests (OpenAI's chat and Responses APIs, Anthropic's Messages API),
served by uvicorn on loopback.

Each target in a test config uses its own base URL, `http://127.0.0.1:PORT/<name>/v1`; what `<name>`
does is its mode: the name's last dash-separated word (`a-500` answers 500), which tests may change while
it runs (PUT /control/<name>). Modes:
  ok       answers like OpenAI (a stream of a role chunk and 5 content chunks, then a usage chunk if
           stream_options.include_usage asks for it; or one body), with content "from <name>"
  nousage  as ok, but never sends usage in streams (as some providers do)
  tools    calls the request's first tool, with the whole request it received as the arguments
  500      OpenAI-shaped 500;  429: 429 with Retry-After: 1;  400: a request error
  stall    sends nothing for 60 s
  cut<N>   streams N chunks (the role chunk first), then drops the connection (cut1: the role chunk alone)
  toolscut<N>  as tools, cut after N chunks (a tool call in progress)
  empty    a stream that ends at once, without a chunk or [DONE]
  fail2    500 for the first 2 requests, then ok
  ctxopenai, ctxvllm, ctxllama  400: the prompt does not fit the context, as OpenAI, vLLM and llama-server say it
Anthropic's Messages API, at <base>/messages and <base>/messages/count_tokens (which counts COUNTED_TOKENS) only
(an Anthropic target's base URL is `anthropic_url(name)`):
  anthropic          answers like Anthropic (a stream of message_start, a text block of 5 deltas, message_delta with
                     the usage, message_stop; or one message), with text "from <name>"
  anthropictools     calls the request's first tool (tool_use), with the whole request it received as the input
  anthropic529, anthropic401, anthropic400: Anthropic-shaped errors (overloaded, authentication, invalid request)
  anthropicfail2     529 for the first 2 requests, then as anthropic
  anthropicoverload  a stream whose first event is followed by an overloaded error event, before any text
OpenAI's Responses API, at <base>/responses only:
  responses          a minimal valid Responses body, or its stream of typed events, with text "from <name>"
GET /control/<name> says how many requests <name> received; `received[name]` holds the last body, and
`headers[name]` its headers.
`RawUpstream` writes raw HTTP/1.1 for what uvicorn never sends (tests/test_hardening_upstream.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

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
        self.headers: dict[str, dict[str, str]] = {}
        routes = [
            Route("/control/{name}", self._control, methods=["GET", "PUT"]),
            Route("/{name}/v1/{endpoint:path}", self._serve, methods=["POST"]),
        ]
        config = uvicorn.Config(Starlette(routes=routes), port=port, log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def base_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/v1"

    def anthropic_url(self, name: str) -> str:
        """The API root, as Anthropic's own (https://api.anthropic.com): the target adds /v1."""
        return f"http://127.0.0.1:{self.port}/{name}"

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
        self.headers[name] = dict(request.headers)
        if mode.startswith("anthropic"):
            return _anthropic(name, mode, request.path_params["endpoint"], body, self.hits[name])
        if mode == "responses":
            return _responses(name, request.path_params["endpoint"], body)
        if mode == "fail2":
            mode = "500" if self.hits[name] <= 2 else "ok"
        if mode in ERRORS:
            status, headers = ERRORS[mode]
            return JSONResponse(_error(status), status_code=status, headers=headers)
        if mode in CONTEXT_ERRORS:
            return JSONResponse(CONTEXT_ERRORS[mode], status_code=400)
        if mode == "stall":
            await asyncio.sleep(60)
        if body.get("stream"):
            return StreamingResponse(_stream(name, mode, body), media_type="text/event-stream")
        return JSONResponse(_completion(name, _tool_call(body) if mode == "tools" else None))


ERRORS = {"500": (500, {}), "429": (429, {"Retry-After": "1"}), "400": (400, {})}
# A prompt too long for the model's context: OpenAI's error (its code), vLLM's (its message; `code` is the status)
# and llama-server's (its type).
CONTEXT_ERRORS = {
    "ctxopenai": {"error": {"message": "This model's maximum context length is 64 tokens. However, your messages "
                            "resulted in 90 tokens.", "type": "invalid_request_error", "param": "messages",
                            "code": "context_length_exceeded"}},
    "ctxvllm": {"error": {"message": "This model's maximum context length is 64 tokens. However, your prompt "
                          "contains 90 input tokens.", "type": "BadRequestError", "param": "input_tokens",
                          "code": 400}},
    "ctxllama": {"error": {"code": 400, "message": "request (90 tokens) exceeds the available context size (64 "
                           "tokens), try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 90,
                           "n_ctx": 64}},
}  # fmt: skip
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
    if mode.startswith("tools"):
        return _tool_call_deltas(_tool_call(body))
    return [({"role": "assistant", "content": ""}, None), *(({"content": word}, None) for word in _words(name))]


def _words(name: str) -> list[str]:
    """What a stream sends, piece by piece: "from <name> upstream"."""
    return [name if word == "<name>" else word for word in WORDS]


def _tool_call_deltas(call: dict) -> list[tuple[dict, str | None]]:
    """A tool call as OpenAI streams it: its id and name first, then the arguments in pieces."""
    arguments = call["function"]["arguments"]
    opening = {**call, "index": 0, "function": {**call["function"], "arguments": ""}}
    pieces = [arguments[i : i + 40] for i in range(0, len(arguments), 40)]
    rest = [({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None) for piece in pieces]
    return [({"role": "assistant", "content": None, "tool_calls": [opening]}, None), *rest, ({}, "tool_calls")]


def _cut_after(mode: str) -> int | None:
    """How many chunks a `cut<N>` (or `toolscut<N>`) mode streams before it drops the connection."""
    count = mode.partition("cut")[2]
    return int(count) if count.isdigit() else None


async def _stream(name: str, mode: str, body: dict):
    if mode == "empty":
        return
    cut = _cut_after(mode)
    for i, (delta, finish_reason) in enumerate(_deltas(name, mode, body)):
        if i == cut:
            raise ConnectionResetError("cut on purpose")  # uvicorn drops the connection mid-body
        yield _chunk(name, delta, finish_reason)
        await asyncio.sleep(0.01)
    if (body.get("stream_options") or {}).get("include_usage") and mode != "nousage":
        yield _chunk(name, {}, usage=STREAM_USAGE)
    yield "data: [DONE]\n\n"


# ---- Anthropic's Messages API ------------------------------------------------------------------------------------

ANTHROPIC_ERRORS = {"anthropic529": (529, "overloaded_error"), "anthropic401": (401, "authentication_error"),
                    "anthropic400": (400, "invalid_request_error")}  # fmt: skip
ANTHROPIC_USAGE = {"input_tokens": 3, "output_tokens": len(WORDS)}
COUNTED_TOKENS = 7  # what /messages/count_tokens answers


def _anthropic(name: str, mode: str, endpoint: str, body: dict, hits: int) -> Response:
    if endpoint == "messages/count_tokens":
        return JSONResponse({"input_tokens": COUNTED_TOKENS})
    if endpoint != "messages":
        return _anthropic_error(404, "not_found_error", f"no endpoint /v1/{endpoint}")
    if mode == "anthropicfail2":
        mode = "anthropic529" if hits <= 2 else "anthropic"
    if mode in ANTHROPIC_ERRORS:
        status, kind = ANTHROPIC_ERRORS[mode]
        return _anthropic_error(status, kind, f"upstream says {status}")
    blocks = [_tool_use(body)] if mode == "anthropictools" else [{"type": "text", "text": f"from {name}"}]
    if body.get("stream"):
        return StreamingResponse(_message_events(name, body, blocks, mode), media_type="text/event-stream")
    stop_reason = "tool_use" if mode == "anthropictools" else "end_turn"
    return JSONResponse(_message(body, blocks, stop_reason, ANTHROPIC_USAGE))


def _anthropic_error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


def _tool_use(body: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_echo", "name": body["tools"][0]["name"], "input": body}


def _message(body: dict, content: list[dict], stop_reason: str | None, usage: dict) -> dict:
    return {"id": "msg_upstream", "type": "message", "role": "assistant", "model": body["model"], "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}  # fmt: skip


def _event(data: dict) -> str:
    """An SSE event named by its type, as Anthropic's and the Responses API's streams are."""
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"


async def _message_events(name: str, body: dict, blocks: list[dict], mode: str):
    started = _message(body, [], None, {"input_tokens": 3, "output_tokens": 1})
    yield _event({"type": "message_start", "message": started})
    if mode == "anthropicoverload":
        yield _event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        return
    start, deltas, stop_reason = _block_deltas(name, blocks[0])
    yield _event({"type": "content_block_start", "index": 0, "content_block": start})
    yield _event({"type": "ping"})
    for delta in deltas:
        yield _event({"type": "content_block_delta", "index": 0, "delta": delta})
        await asyncio.sleep(0.01)
    yield _event({"type": "content_block_stop", "index": 0})
    yield _event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                  "usage": {"output_tokens": len(deltas)}})  # fmt: skip
    yield _event({"type": "message_stop"})


def _block_deltas(name: str, block: dict) -> tuple[dict, list[dict], str]:
    """A content block as Anthropic streams it: its start (empty), its deltas, and the message's stop reason."""
    if block["type"] == "tool_use":
        arguments = json.dumps(block["input"])
        pieces = [arguments[i : i + 40] for i in range(0, len(arguments), 40)]
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": p} for p in pieces], "tool_use"
    return {**block, "text": ""}, [{"type": "text_delta", "text": word} for word in _words(name)], "end_turn"


# ---- OpenAI's Responses API -----------------------------------------------------------------------------------------

RESPONSES_USAGE = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(WORDS),
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 3 + len(WORDS)}  # fmt: skip


def _responses(name: str, endpoint: str, body: dict) -> Response:
    if endpoint != "responses":
        return JSONResponse(_error(404), status_code=404)
    response_id = f"resp_{uuid.uuid4().hex}"  # unique, as a provider's: the gateway stores responses by id
    if body.get("stream"):
        return StreamingResponse(_response_events(name, body, response_id), media_type="text/event-stream")
    text = f"from {name}"  # as a whole answer of the chat modes
    output = [_output_message(text, "completed")]
    return JSONResponse(_response(response_id, body, "completed", output, RESPONSES_USAGE))


def _response(response_id: str, body: dict, status: str, output: list[dict], usage: dict | None) -> dict:
    return {"id": response_id, "object": "response", "created_at": 0, "status": status, "model": body["model"],
            "output": output, "usage": usage, "error": None, "incomplete_details": None, "instructions": None,
            "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
            "tools": []}  # fmt: skip


def _output_message(text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text else []
    return {"type": "message", "id": "msg_upstream", "status": status, "role": "assistant", "content": content}


async def _response_events(name: str, body: dict, response_id: str):
    text = "".join(_words(name))
    item = {"item_id": "msg_upstream", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    events = [
        {"type": "response.created", "response": _response(response_id, body, "in_progress", [], None)},
        {"type": "response.in_progress", "response": _response(response_id, body, "in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0, "item": _output_message("", "in_progress")},
        {"type": "response.content_part.added", **item, "part": part},
        *({"type": "response.output_text.delta", **item, "delta": word, "logprobs": []} for word in _words(name)),
        {"type": "response.output_text.done", **item, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **item, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": _output_message(text, "completed")},
        {"type": "response.completed",
         "response": _response(response_id, body, "completed", [_output_message(text, "completed")], RESPONSES_USAGE)},
    ]  # fmt: skip
    for number, event in enumerate(events):
        yield _event({**event, "sequence_number": number})
        await asyncio.sleep(0.01)


class RawUpstream:
    """A raw HTTP/1.1 server on loopback, on its own thread and event loop, for answers no framework sends
    (interim responses, bytes after a response, a body without end, a dropped request). Each mode listens on
    its own port (so no pool shares a connection between two), at `http://127.0.0.1:PORT/<name>/v1`;
    `modes[name](request, writer)` answers each request and says whether the connection reads on.
    `requests` and `connections` count what each name received."""

    def __init__(self, modes: dict[str, Callable[[RawRequest, asyncio.StreamWriter], Awaitable[bool]]]):
        self.modes = modes
        self.requests: collections.Counter = collections.Counter()
        self.connections: collections.Counter = collections.Counter()
        self._ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def base_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._ports[name]}/{name}/v1"

    def start(self) -> "RawUpstream":
        self._thread.start()
        for name in self.modes:
            serving = asyncio.start_server(self._serve, "127.0.0.1", 0)
            server = asyncio.run_coroutine_threadsafe(serving, self._loop).result(timeout=10)
            self._servers.append(server)
            self._ports[name] = server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _shut(self) -> None:
        for server in self._servers:
            server.close()
        serving = asyncio.all_tasks() - {asyncio.current_task()}
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        try:
            while request := await RawRequest.read(reader, index):
                self.requests[request.name] += 1
                self.connections[request.name] += index == 0
                index += 1
                if not await self.modes[request.name](request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client dropped the connection: what some modes are for
        finally:
            writer.close()


@dataclass
class RawRequest:
    head: bytes
    body: bytes
    index: int  # of the requests on its connection, from 0

    @property
    def name(self) -> str:
        return self.head.split(b" ", 2)[1].decode().split("/")[1]

    def json(self) -> dict:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @classmethod
    async def read(cls, reader: asyncio.StreamReader, index: int) -> "RawRequest | None":
        """The next request on the connection, None when the client closed it between requests."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        request = cls(head, b"", index)
        request.body = await reader.readexactly(int(request.header("content-length") or 0))
        return request


def raw_completion(content: str) -> bytes:
    """A whole HTTP/1.1 200 response carrying an OpenAI chat completion whose message is `content`."""
    body = json.dumps(_completion("raw", None) | {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
