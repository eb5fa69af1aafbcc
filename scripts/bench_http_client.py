"""CPU the gateway spends per relayed request in each upstream HTTP client (gateway/upstream/client.py).

Starts a trivial OpenAI-shaped upstream in a separate process (so its CPU is not counted), then drives
each client implementation through the same seam the remote targets use: whole bodies, and streams
of 20 SSE chunks read line by line. Prints CPU milliseconds per request of this process.

    python scripts/bench_http_client.py [--requests 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.upstream.client import HTTP_CLIENTS  # noqa: E402

BODY = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 20}, "finish_reason": "stop"}],
}).encode()  # fmt: skip
CHUNK = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


async def upstream_app(scope, receive, send):
    """A raw ASGI upstream: as little server work as possible, so the client side dominates."""
    request = b""
    while True:
        message = await receive()
        request += message.get("body", b"")
        if not message.get("more_body"):
            break
    stream = b'"stream": true' in request or b'"stream":true' in request
    content_type = b"text/event-stream" if stream else b"application/json"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
    if stream:
        for _ in range(20):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        await send({"type": "http.response.body", "body": BODY})


async def one(client, url: str, stream: bool) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
    async with client.post(url, body, {"Content-Type": "application/json"}, 5, 30) as response:
        if stream:
            async for _ in response.lines():
                pass
        else:
            await response.read()


async def measure(name: str, url: str, requests: int, concurrency: int, stream: bool) -> tuple[float, float]:
    client = HTTP_CLIENTS[name]()
    try:
        for _ in range(50):  # warm the pool
            await one(client, url, stream)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests // concurrency):
            await asyncio.gather(*(one(client, url, stream) for _ in range(concurrency)))
        done = requests // concurrency * concurrency
        return (time.process_time() - cpu) * 1000 / done, (time.perf_counter() - wall) * 1000 / done
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvicorn

        uvicorn.run(upstream_app, port=args.serve, log_level="warning", access_log=False)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        time.sleep(2)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print(f"{'client':8} {'mode':6} {'CPU ms/request':>15} {'wall ms/request':>16}")
        for name in HTTP_CLIENTS:
            for stream in (False, True):
                cpu, wall = asyncio.run(measure(name, url, args.requests, args.concurrency, stream))
                print(f"{name:8} {'stream' if stream else 'body':6} {cpu:15.3f} {wall:16.3f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
