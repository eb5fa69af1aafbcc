"""GET /health (liveness: the process answers, with what is loaded; open to probes, and showing providers'
URLs only to an admin key), GET /ready (readiness: the default model can serve now), and GET / (where to look
next)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.models.devices import rss_bytes

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    router = request.app.state.router
    engines = [{**dataclasses.asdict(model.info()), "kind": model.kind, "location": model.location()}
               for model in router.engines()]  # fmt: skip
    states = {e["state"] for e in engines}
    # an unloaded model is fine: it loads again on its next request; one in the warm pool moves back on it
    status = "ok" if states <= {"ready", "unloaded", "offloaded"} else "error" if "failed" in states else "loading"
    if "stalled" in states:  # an engine stuck inside one step answers nothing more: let an orchestrator see it
        status = "stalled"
    first = engines[0] if engines else {}
    body = {
        "status": status,
        "engine": first.get("engine"),
        "model": first.get("model"),
        "device": first.get("device"),
        "memory": {"rss_bytes": rss_bytes(), "model_bytes": sum(e["memory_bytes"] for e in engines)},
        "models": engines,
        "targets": _targets(request),
        "governor": request.app.state.models.state(),
    }
    return JSONResponse(body, status_code=503 if status in ("error", "stalled") else 200)


def _targets(request: Request) -> dict[str, dict]:
    """Each target's state; a provider's URL only for an admin key (the probes that poll this carry none)."""
    with_urls = request.app.state.keys.is_admin(dict(request.scope["headers"]))
    targets = {target.name: target.health() for target in request.app.state.router.targets()}
    if not with_urls:
        for state in targets.values():
            state.pop("base_url", None)
            for endpoint in state.get("endpoints", ()):  # an engine pool's
                endpoint.pop("url")
    return targets


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the default model has loaded; 503 with Retry-After before, so a balancer waits for it.

    A default model unloaded for idleness later stays ready: it loads again on its next request."""
    name = request.app.state.default_model
    state = request.app.state.router.readiness(name)
    if state == "ready":
        return JSONResponse({"status": "ready", "model": name})
    return JSONResponse({"status": state, "model": name}, status_code=503, headers={"Retry-After": "1"})


@router.get("/")
async def root() -> dict:
    return {
        "name": "local-llm-gateway",
        "openai_base_url": "/v1",
        "endpoints": ["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                      "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/models", "/tokenize", "/detokenize",
                      "/health", "/ready", "/metrics"],
        "docs": "/docs",
        "openapi": "/openapi.json",
    }  # fmt: skip
