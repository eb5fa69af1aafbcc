"""GET /health (liveness plus what is loaded) and GET / (where to look next)."""

from __future__ import annotations

import dataclasses
import os
import resource

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engines = [dataclasses.asdict(engine.info()) for engine in request.app.state.router.engines()]
    states = {e["state"] for e in engines}
    status = "ok" if states == {"ready"} else "error" if "failed" in states else "loading"
    first = engines[0] if engines else {}
    body = {
        "status": status,
        "engine": first.get("engine"),
        "model": first.get("model"),
        "device": first.get("device"),
        "memory": {"rss_bytes": _rss_bytes(), "model_bytes": sum(e["memory_bytes"] for e in engines)},
        "models": engines,
    }
    return JSONResponse(body, status_code=200 if status != "error" else 503)


@router.get("/")
async def root() -> dict:
    return {
        "name": "local-llm-gateway",
        "openai_base_url": "/v1",
        "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health"],
        "docs": "/docs",
        "openapi": "/openapi.json",
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
