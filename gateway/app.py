"""The FastAPI application: settings → engine → routes. `create_app` is all a server needs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI

from engines import create_engine
from engines.base import EngineConfig
from gateway import metrics, tracing
from gateway.api import chat, completions, embeddings, health, models
from gateway.api import metrics as metrics_api
from gateway.errors import install_error_handlers
from gateway.model_registry import ModelRegistry
from gateway.observability import RequestIdMiddleware
from gateway.routing import ModelRouter
from gateway.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="local-llm-gateway", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    app.state.router = ModelRouter()
    app.state.started = int(time.time())
    metrics.install(metrics.EngineCollector(lambda: [e.info() for e in app.state.router.engines()], lambda: {}))
    for module in (chat, completions, embeddings, models, health, metrics_api):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def engine_config(settings: Settings) -> tuple[str, EngineConfig]:
    registry = ModelRegistry.load(settings.registry)
    resolved = registry.resolve(settings.model, settings.models_dir, settings.served_model_name)
    config = EngineConfig(
        model_path=resolved.path,
        served_name=resolved.served_name,
        context_length=settings.ctx,
        threads=settings.threads,
        gpu_layers=settings.gpu_layers,
        parallel=settings.parallel,
        batch_size=settings.batch_size,
        embedding=settings.embedding,
        max_waiting=settings.max_queue,
    )
    return resolved.served_name, config


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    name, config = engine_config(settings)
    engine = create_engine(settings.engine, config)
    app.state.router.add(name, engine)
    app.state.default_model = name
    tracing.configure()
    # Load in the background: the server answers /health (and 503 for the model) while it loads.
    loading = asyncio.create_task(_load(engine, name))
    try:
        yield
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await engine.close()
        tracing.shutdown()


async def _load(engine, name: str) -> None:
    started = time.perf_counter()
    try:
        await engine.load()
    except Exception:
        log.exception("loading model %s failed", name)
        return
    log.info("model %s ready on %s in %.1fs", name, engine.name, time.perf_counter() - started)
