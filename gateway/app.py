"""The FastAPI application: settings → routing config → targets → routes. `create_app` is all a server needs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp

from engines import DEFAULT_EMBEDDING_MODELS, create_engine
from engines.base import EngineConfig
from gateway.api import chat, completions, embeddings, health, models, rerank, responses, tokenize
from gateway.api import metrics as metrics_api
from gateway.api.messages import routes as messages
from gateway.api.messages.provider import AnthropicTranslation
from gateway.api.protocol import apply_limits
from gateway.api.responses.store import ResponseStore, sqlite_at
from gateway.errors import install_error_handlers
from gateway.front.body import BodyGuard, OwnBodyLane, include_body_schemas
from gateway.front.keys import ApiKeyMiddleware, KeyRing
from gateway.models.download import ModelDownload
from gateway.models.governor import memory_governor
from gateway.models.lifecycle import ManagedModel, ModelManager
from gateway.models.registry import ModelRegistry, ResolvedModel, estimate_bytes, what_would_fit
from gateway.routing.breaker import Breaker
from gateway.routing.config import (
    AnthropicTargetConfig,
    GatewayConfig,
    LocalTargetConfig,
    RemoteTargetConfig,
    RetryPolicy,
    env_api_keys,
    load_config,
    simple_config,
)
from gateway.routing.pool import Pool
from gateway.routing.router import ModelRouter
from gateway.routing.targets import AnthropicTarget, LocalHandler, LocalTarget, ProviderAdapter, RemoteTarget
from gateway.settings import Settings
from gateway.state.local import LocalState
from gateway.state.shared import SharedState
from gateway.telemetry import metrics, tracing
from gateway.telemetry.requests import RequestIdMiddleware
from gateway.upstream.client import Limits, create_http_client


class GatewayApp(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        """Starlette's stack (error pages, exception handlers, routes) inside the gateway's own layers: every
        request gets an id, a log line and a count, /v1/ paths need a key, bodies must be JSON within the size limit,
        and model endpoints get their own lane."""
        starlette_stack = super().build_middleware_stack()
        return RequestIdMiddleware(ApiKeyMiddleware(BodyGuard(OwnBodyLane(starlette_stack, self.routes))))


# How a local model answers each model endpoint: the protocol front ends' own serving functions.
LOCAL_HANDLERS: dict[str, LocalHandler] = {
    "chat/completions": chat.serve_locally,
    "completions": completions.serve_locally,
    "embeddings": embeddings.serve_locally,
    "rerank": rerank.serve_locally,
    "messages/count_tokens": messages.count_locally,  # a token count: the prompt rendered, never generated
}
# How a `type: anthropic` target is sent the internal chat request: the Messages front end's translation.
ANTHROPIC_ADAPTER: ProviderAdapter = AnthropicTranslation()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = GatewayApp(title="local-llm-gateway", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    # On the request models, which every app in this process shares.
    apply_limits(settings, (*tokenize.LIMITED_MODELS, *messages.LIMITED_MODELS, *responses.LIMITED_MODELS,
                            *rerank.LIMITED_MODELS))
    app.state.router = ModelRouter()  # filled at start-up
    app.state.keys = KeyRing([], LocalState())
    app.state.retry = RetryPolicy()
    app.state.started = int(time.time())
    metrics.install(metrics.EngineCollector(lambda: [e.info() for e in app.state.router.engines()],
                                            lambda: _memory_gauges(app)))  # fmt: skip
    metrics.install(metrics.PoolCollector(lambda: [c for pool in _pools(app.state.router) for c in pool.counts()]))
    for module in (chat, completions, embeddings, rerank, models, health, metrics_api, tokenize, messages, responses):
        app.include_router(module.router)
    include_body_schemas(app)
    install_error_handlers(app)
    return app


def _memory_gauges(app: FastAPI) -> dict[str, float]:
    if not hasattr(app.state, "models"):  # before start-up
        return {}
    state = app.state.models.state()
    warm = state["warm_pool"]
    return {"budget_bytes": state["budget_bytes"], "used_bytes": state["used_bytes"],
            "pressure_ratio": state["used_bytes"] / state["budget_bytes"],
            "warm_pool_budget_bytes": warm["budget_bytes"], "warm_pool_used_bytes": warm["used_bytes"]}  # fmt: skip


def resolve_local(settings: Settings, registry: ModelRegistry, target: LocalTargetConfig,
                  ) -> tuple[ResolvedModel, Callable | None]:  # fmt: skip
    """A local target's file and public name, and for the default model (a target without its own
    `model`) with LLM_MODEL_URL set, how to fetch that file first."""
    served_name = settings.served_model_name if target.model is None else None
    if target.model is not None or settings.model_url is None:
        return registry.resolve(target.model or settings.model, settings.models_dir, served_name), None
    download = ModelDownload.into(
        settings.models_dir, settings.model_url, checksum=settings.model_checksum,
        timeout=settings.download_timeout, retries=settings.download_retries,
    )  # fmt: skip
    entry = registry.entries.get(settings.model)
    served_name = served_name or (entry.name if entry else download.target.stem)
    return ResolvedModel(str(download.target), served_name, entry), lambda: asyncio.to_thread(download.ensure)


# Settings every engine receives in EngineConfig.options (a target's own options win); each engine
# reads the ones it knows.
ENGINE_OPTIONS = (
    "quantization", "dtype", "trust_remote_code", "gpu_memory_utilization", "max_model_len", "max_num_seqs",
    "kv_cache_dtype", "enable_prefix_caching", "tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size",
    "distributed_executor_backend", "enforce_eager",
)  # fmt: skip


def embedding_model(settings: Settings) -> str | None:
    """The embedding model served beside the chat model: LLM_EMBEDDING_MODEL, else the engine's own."""
    name = settings.embedding_model or DEFAULT_EMBEDDING_MODELS.get(settings.engine, "none")
    return None if name == "none" else name


def model_task(resolved: ResolvedModel) -> dict[str, str]:
    """The registry's task for the model (a reranker, an embedding model), which the target's options may override."""
    return {"task": resolved.entry.task} if resolved.entry is not None and resolved.entry.task else {}


def engine_config(settings: Settings, target: LocalTargetConfig, resolved: ResolvedModel) -> EngineConfig:
    """A local target's engine options: the target's own, else the LLM_* settings."""

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
        options={**{name: getattr(settings, name) for name in ENGINE_OPTIONS}, **model_task(resolved),
                 **target.options},  # fmt: skip
    )


def gateway_config(settings: Settings, registry: ModelRegistry) -> GatewayConfig:
    if settings.config is not None:
        return load_config(settings.config)
    resolved, _ = resolve_local(settings, registry, LocalTargetConfig(type="local"))
    return simple_config(settings, resolved.served_name, embedding_model(settings))


# A local target's `options.task` → the kind of model it is (a chat model when it names none).
MODEL_KINDS = {"embed": "embedding", "rerank": "rerank"}


def managed_model(settings: Settings, registry: ModelRegistry, manager: ModelManager,
                  target: LocalTargetConfig) -> ManagedModel:  # fmt: skip
    resolved, prepare = resolve_local(settings, registry, target)
    config = engine_config(settings, target, resolved)
    engine_name = target.engine or settings.engine
    kind = MODEL_KINDS.get(config.options.get("task"), "chat")
    return ManagedModel(
        resolved.served_name, lambda: create_engine(engine_name, config),
        estimate_bytes(resolved.entry, resolved.path), manager,
        suggest=lambda free: what_would_fit(registry, resolved.entry, free), prepare=prepare,
        tool_format=target.options.get("tool_parser"), kind=kind,
    )  # fmt: skip


def shared_state(settings: Settings) -> SharedState:
    """Where replicas keep what they must agree on (limits, cooldowns, stored responses): Redis with LLM_REDIS_URL,
    else each process."""
    if settings.redis_url is None:
        return LocalState()
    try:
        from gateway.state.redis_state import RedisState  # the optional `redis` extra
    except ImportError as error:
        raise SystemExit(f"LLM_REDIS_URL needs the redis package: pip install 'local-llm-gateway[redis]' ({error})")
    # A hold outlives any request (the longest deadline): one whose replica died lapses after it.
    lease = max(settings.request_timeout, settings.max_request_timeout) + 60
    return RedisState(settings.redis_url, settings.redis_timeout, settings.redis_fail_open, lease)


def response_store(settings: Settings, state: SharedState) -> ResponseStore:
    max_age = settings.responses_max_age_days * 86400
    own = sqlite_at(settings.data_dir / "responses.sqlite3", settings.responses_max_stored, max_age)
    return ResponseStore(state.responses(own, settings.responses_max_stored, max_age))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    registry = ModelRegistry.load(settings.registry)
    config = gateway_config(settings, registry)
    app.state.retry = config.retry
    state = shared_state(settings)
    await state.start()
    app.state.keys = KeyRing(config.api_keys + env_api_keys(settings), state)
    app.state.responses = response_store(settings, state)
    needs_http = any(isinstance(t, RemoteTargetConfig) for t in config.targets.values())
    limits = Limits(settings.upstream_max_body_bytes, settings.upstream_max_line_bytes)
    http = create_http_client(settings.http_client, limits) if needs_http else None
    manager = ModelManager(
        memory_governor(settings), settings.unload_after_seconds, settings.load_wait_seconds, settings.stall_after
    )
    targets: dict = {}
    for name, target in config.targets.items():
        breaker = Breaker(state.circuit(name, config.retry.failures_to_cool, config.retry.cooldown))
        if isinstance(target, LocalTargetConfig):
            model = managed_model(settings, registry, manager, target)
            manager.add(model)
            targets[name] = LocalTarget(name, model, LOCAL_HANDLERS, breaker)
        elif isinstance(target, AnthropicTargetConfig):
            targets[name] = AnthropicTarget(name, target, http, breaker, ANTHROPIC_ADAPTER)
        else:
            targets[name] = RemoteTarget(name, target, http, breaker)
    app.state.router = ModelRouter(targets, config.routes(), config.continuing())
    app.state.models = manager
    app.state.default_model = next(iter(config.models))
    tracing.configure()
    # Load the default model's local models in the background (the server answers /health, and 503 for
    # them, meanwhile); the others load on first use.
    preloaded = [app.state.default_model, *(m for m in [embedding_model(settings)] if m in config.models)]
    chains = [app.state.router.resolve(name).targets for name in preloaded]
    tasks = [asyncio.create_task(_preload(t.model)) for c in chains for t in c if isinstance(t, LocalTarget)]
    tasks.append(asyncio.create_task(manager.run_sweeper()))
    # Engine pools' active health checks.
    tasks += [asyncio.create_task(p.run_checks()) for p in _pools(app.state.router) if p.policy.health_interval]
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await manager.close()
        if http is not None:
            await http.close()
        await state.close()
        tracing.shutdown()


def _pools(router: ModelRouter) -> list[Pool]:
    """The engine pools of remote targets with `endpoints`."""
    return [t.pool for t in router.targets() if isinstance(t, RemoteTarget) and t.pool is not None]


async def _preload(model: ManagedModel) -> None:
    with contextlib.suppress(Exception):  # the model logs its failure and /health shows it
        await model.load()
