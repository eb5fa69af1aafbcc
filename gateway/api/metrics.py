"""GET /metrics: Prometheus text for scrapers; `?format=json` a short summary for people."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.models import devices
from gateway.telemetry import metrics

router = APIRouter()


@router.get("/metrics", response_model=None)
async def get_metrics(request: Request, format: Literal["prometheus", "json"] = "prometheus") -> Response | dict:
    if format == "json":
        return summary(request.app)
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


def summary(app) -> dict:
    infos = [engine.info() for engine in app.state.router.engines()]
    gpu = devices.gpu()
    allocated = sum(info.memory_bytes for info in infos)
    return {
        "model": app.state.default_model,
        "device": "cuda" if gpu else "cpu",
        "gpu_name": gpu.name if gpu else None,
        "memory": {
            "allocated_bytes": allocated,  # held by loaded models
            # what the process holds on its device: GPU memory on CUDA, resident RAM on a CPU
            "reserved_bytes": gpu.process_bytes if gpu else devices.rss_bytes(),
            "device_total_bytes": gpu.total_bytes if gpu else devices.ram_bytes(),
        },
        "models": [
            {"model": i.model, "engine": i.engine, "state": i.state, "device": i.device,
             "memory_bytes": i.memory_bytes, "running": i.running, "waiting": i.waiting}
            for i in infos
        ],  # fmt: skip
    }
