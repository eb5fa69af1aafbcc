"""The FastAPI application: settings → routing config → targets → routes. `create_app` is all a server needs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import Depends, FastAPI

from engines import create_engine
from engines.base import Engine, EngineConfig
from gateway import metrics, tracing
from gateway.api import chat, completions, embeddings, health, models
from gateway.api import metrics as metrics_api
from gateway.config import GatewayConfig, RetryPolicy, env_api_keys, load_config, simple_config
from gateway.config import LocalTarget as LocalConfig
from gateway.config import RemoteTarget as RemoteConfig
from gateway.errors import install_error_handlers
from gateway.model_registry import ModelRegistry
from gateway.observability import RequestIdMiddleware
from gateway.routing import ModelRouter
from gateway.security import KeyRing, authorize
from gateway.settings import Settings
from gateway.targets import Breaker, LocalTarget, RemoteTarget
from gateway.upstream import create_http_client

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="local-llm-gateway", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    app.state.router = ModelRouter()  # filled at start-up
    app.state.keys = KeyRing([])
    app.state.retry = RetryPolicy()
    app.state.started = int(time.time())
    metrics.install(metrics.EngineCollector(lambda: [e.info() for e in app.state.router.engines()], lambda: {}))
    for module in (chat, completions, embeddings, models):
        app.include_router(module.router, dependencies=[Depends(authorize)])
    for module in (health, metrics_api):
        app.include_router(module.router)  # open without a key, for probes, balancers and scrapers
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def engine_config(settings: Settings, target: LocalConfig) -> EngineConfig:
    """A local target's engine options: the target's own, else the LLM_* settings."""
    registry = ModelRegistry.load(settings.registry)
    served_name = settings.served_model_name if target.model is None else None
    resolved = registry.resolve(target.model or settings.model, settings.models_dir, served_name)

    def pick(value, default):
        return default if value is None else value

    return EngineConfig(
        model_path=resolved.path,
        served_name=resolved.served_name,
        context_length=pick(target.context_length, settings.ctx),
        threads=pick(target.threads, settings.threads),
        gpu_layers=pick(target.gpu_layers, settings.gpu_layers),
        parallel=pick(target.parallel, settings.parallel),
        batch_size=pick(target.batch_size, settings.batch_size),
        embedding=pick(target.embedding, settings.embedding),
        max_waiting=pick(target.max_waiting, settings.max_queue),
        options=target.options,
    )


def gateway_config(settings: Settings) -> GatewayConfig:
    if settings.config is not None:
        return load_config(settings.config)
    served_name = engine_config(settings, LocalConfig(type="local")).served_name
    return simple_config(settings, served_name)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    config = gateway_config(settings)
    app.state.retry = config.retry
    app.state.keys = KeyRing(config.api_keys + env_api_keys(settings))
    needs_http = any(isinstance(t, RemoteConfig) for t in config.targets.values())
    http = create_http_client(settings.http_client) if needs_http else None
    targets: dict = {}
    for name, target in config.targets.items():
        breaker = Breaker(config.retry.failures_to_cool, config.retry.cooldown)
        if isinstance(target, LocalConfig):
            engine = create_engine(target.engine or settings.engine, engine_config(settings, target))
            targets[name] = LocalTarget(name, engine, breaker)
        else:
            targets[name] = RemoteTarget(name, target, http, breaker)
    app.state.router = ModelRouter(targets, config.routes())
    app.state.default_model = next(iter(config.models))
    engines = app.state.router.engines()
    tracing.configure()
    # Load in the background: the server answers /health (and 503 for the model) while it loads.
    loading = [asyncio.create_task(_load(engine)) for engine in engines]
    try:
        yield
    finally:
        for task in loading:
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)
        for engine in engines:
            await engine.close()
        if http is not None:
            await http.close()
        tracing.shutdown()


async def _load(engine: Engine) -> None:
    name = engine.info().model
    started = time.perf_counter()
    try:
        await engine.load()
    except Exception:
        log.exception("loading model %s failed", name)
        return
    log.info("model %s ready on %s in %.1fs", name, engine.name, time.perf_counter() - started)
