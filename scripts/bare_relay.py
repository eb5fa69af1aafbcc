"""The floor for benchmark 3: the least a FastAPI relay can do. One route reads the body, posts it to the
upstream with one shared aiohttp session and returns the answer: no validation, routing, keys, timeouts,
retries, metrics or logs. It is what the gateway's own features are measured against, not a product.

    python scripts/bare_relay.py UPSTREAM_URL PORT
"""

from __future__ import annotations

import contextlib
import sys

import aiohttp
import uvicorn
from fastapi import FastAPI, Request, Response


def create_app(upstream: str) -> FastAPI:
    session: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        session.append(aiohttp.ClientSession())
        yield
        await session[0].close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def relay(request: Request) -> Response:
        body = await request.body()
        async with session[0].post(upstream, data=body, headers={"Content-Type": "application/json"}) as answer:
            return Response(await answer.read(), status_code=answer.status, media_type="application/json")

    return app


if __name__ == "__main__":
    upstream_url, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(create_app(upstream_url), host="127.0.0.1", port=port, log_config=None, access_log=False)
