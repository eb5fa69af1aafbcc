"""Prometheus metrics, served at GET /metrics. Every metric the gateway exports is declared here.

Other modules record through this module's functions, never through prometheus_client directly, so
names and labels stay in one place:
- `observe_request(record)`: once per HTTP request (the access middleware calls it).
- `observe_first_token(record)`, `token_gap_observer(record)`: while tokens stream.
- `record_fallback(model, from_target, to_target)`, `record_retry(target)`, `record_cooldown(target)`:
  for the routing layer (fallback chains, retries, circuit breakers).
- `record_model_event(model, event)`: loads and unloads (with the reason) from the model lifecycle;
  `record_offload(model, reason)`, `record_restore(model)`: moves to and from the governor's warm pool.
- `record_shared_state_fallback(state)`, `set_shared_state_up(up)`: from the Redis state (gateway/state/).
Engine gauges (queue depth, running requests, loaded models and their memory) are read from the
engines at scrape time by `EngineCollector`, so they are never stale; so are the endpoints of engine pools
(`PoolCollector`: requests, failures, ejections, requests in flight, ejected), from the pools' own counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from engines.base import EngineInfo

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

# Latencies of local models span milliseconds (a token) to minutes (a long answer on a CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "llm_requests", "HTTP requests by route template, model, target and status code",
    ["route", "model", "target", "status"], registry=REGISTRY,
)  # fmt: skip
REQUEST_LATENCY = Histogram(
    "llm_request_duration_seconds", "End-to-end request latency, until the last byte was sent",
    ["route", "model", "target"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds", "From the request's arrival to its first generated token",
    ["model", "target"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
INTER_TOKEN_LATENCY = Histogram(
    "llm_inter_token_latency_seconds", "Time between successive tokens of one choice",
    ["model", "target"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
PROMPT_TOKENS = Counter("llm_prompt_tokens", "Prompt tokens processed", ["model", "target"], registry=REGISTRY)
COMPLETION_TOKENS = Counter(
    "llm_completion_tokens", "Completion tokens generated", ["model", "target"], registry=REGISTRY
)
FALLBACKS = Counter(
    "llm_fallbacks", "Requests passed from one target to the next in a fallback chain",
    ["model", "from_target", "to_target"], registry=REGISTRY,
)  # fmt: skip
RETRIES = Counter("llm_retries", "Retried attempts against a target", ["target"], registry=REGISTRY)
COOLDOWNS = Counter(
    "llm_cooldowns", "Times a target's circuit breaker opened (the target cools down)", ["target"], registry=REGISTRY
)
MODEL_EVENTS = Counter(
    "llm_model_events", "Model loads and unloads; event is load, load_failed, or unload_<reason>",
    ["model", "event"], registry=REGISTRY,
)  # fmt: skip
OFFLOADS = Counter(
    "llm_model_offloads", "Models moved from the GPU to the warm pool in host RAM; reason: memory, pressure_<level>",
    ["model", "reason"], registry=REGISTRY,
)  # fmt: skip
RESTORES = Counter(
    "llm_model_restores", "Models moved back from the warm pool to the GPU (on their next request)", ["model"],
    registry=REGISTRY,
)  # fmt: skip
SHARED_STATE_FALLBACKS = Counter(
    "llm_shared_state_fallbacks", "Operations on limits, cooldowns or responses (state) served from this replica's "
    "own state because Redis (LLM_REDIS_URL) was unreachable", ["state"], registry=REGISTRY,
)  # fmt: skip
SHARED_STATE_UP = Gauge(
    "llm_shared_state_up", "1 while the shared state's backend (redis: LLM_REDIS_URL) answers, 0 during an outage; "
    "absent without one", ["backend"], registry=REGISTRY,
)  # fmt: skip


def observe_request(record) -> None:
    """Count a finished request (a `gateway.observability.RequestRecord`)."""
    series = _request_series(record.route, record.model or "", record.target, record.status)
    requests, latency, prompt, completion = series
    requests.inc()
    latency.observe(record.elapsed())
    if record.prompt_tokens:
        prompt.inc(record.prompt_tokens)
    if record.completion_tokens:
        completion.inc(record.completion_tokens)


@functools.lru_cache(maxsize=4096)
def _request_series(route: str, model: str, target: str, status: int) -> tuple:
    """The four series a request's labels name, looked up once: `labels()` validates and locks on every call.
    (Label values are few: route templates, configured model names, targets and status codes.)"""
    return (
        REQUESTS.labels(route, model, target, str(status)),
        REQUEST_LATENCY.labels(route, model, target),
        PROMPT_TOKENS.labels(model, target),
        COMPLETION_TOKENS.labels(model, target),
    )


def observe_first_token(record) -> None:
    TIME_TO_FIRST_TOKEN.labels(record.model or "", record.target).observe(record.ttft())


def token_gap_observer(record) -> Callable[[float], None]:
    """Observes inter-token gaps of `record`'s model and target; looked up once per stream, not per token."""
    return INTER_TOKEN_LATENCY.labels(record.model or "", record.target).observe


def record_fallback(model: str, from_target: str, to_target: str) -> None:
    FALLBACKS.labels(model, from_target, to_target).inc()


def record_retry(target: str) -> None:
    RETRIES.labels(target).inc()


def record_cooldown(target: str) -> None:
    COOLDOWNS.labels(target).inc()


def record_model_event(model: str, event: str) -> None:
    MODEL_EVENTS.labels(model, event).inc()


def record_offload(model: str, reason: str) -> None:
    OFFLOADS.labels(model, reason).inc()


def record_restore(model: str) -> None:
    RESTORES.labels(model).inc()


def record_shared_state_fallback(state: str) -> None:
    SHARED_STATE_FALLBACKS.labels(state).inc()


def set_shared_state_up(up: bool) -> None:
    SHARED_STATE_UP.labels("redis").set(1 if up else 0)


class EngineCollector:
    """Gauges read from the engines at scrape time: state, queue depth, running requests, memory, step age."""

    def __init__(self, engines: Callable[[], Iterable[EngineInfo]], memory: Callable[[], dict[str, float]]):
        self._engines = engines
        self._memory = memory

    def collect(self):
        labels = ["model", "engine"]
        loaded = GaugeMetricFamily("llm_model_loaded", "1 when the model is loaded and ready", labels=labels)
        memory = GaugeMetricFamily("llm_model_memory_bytes", "Memory the loaded model holds", labels=labels)
        running = GaugeMetricFamily("llm_engine_running", "Requests being decoded now", labels=labels)
        waiting = GaugeMetricFamily("llm_engine_waiting", "Requests queued for a free slot", labels=labels)
        busy = GaugeMetricFamily(
            "llm_engine_busy_seconds", "How long the engine's current step has run (0 between steps)", labels=labels
        )
        for info in self._engines():
            key = [info.model, info.engine]
            loaded.add_metric(key, 1.0 if info.state == "ready" else 0.0)
            memory.add_metric(key, float(info.memory_bytes))
            running.add_metric(key, float(info.running))
            waiting.add_metric(key, float(info.waiting))
            busy.add_metric(key, info.busy_s)
        yield from (loaded, memory, running, waiting, busy)
        for name, value in self._memory().items():
            yield GaugeMetricFamily(f"llm_memory_{name}", _MEMORY_HELP[name], value=value)


_MEMORY_HELP = {
    "budget_bytes": "Memory the governor may fill with models (GPU memory on CUDA, else the RAM budget)",
    "used_bytes": "Memory held by loaded models",
    "pressure_ratio": "used_bytes / budget_bytes",
    "warm_pool_budget_bytes": "Host RAM the warm pool may fill with embedding models and rerankers (0: off, on a CPU)",
    "warm_pool_used_bytes": "Host RAM held by models in the warm pool",
}


@dataclass(frozen=True)
class EndpointCounts:
    """One endpoint of an engine pool, as its pool counts it."""

    target: str
    endpoint: str  # its place in the target's list, from 0 (URLs stay out of /metrics, which any client may read)
    requests: int
    failures: int
    ejections: int
    outstanding: int
    ejected: bool  # ejected after failures, or down by its health check


class PoolCollector:
    """Series of every pool endpoint, read at scrape time: nothing is recorded per request."""

    def __init__(self, endpoints: Callable[[], Iterable[EndpointCounts]]):
        self._endpoints = endpoints

    def collect(self):
        labels = ["target", "endpoint"]
        requests = CounterMetricFamily("llm_endpoint_requests", "Requests sent to a pool endpoint", labels=labels)
        failures = CounterMetricFamily(
            "llm_endpoint_failures", "Requests a pool endpoint failed (unreachable, 5xx, 429, cut)", labels=labels
        )
        ejections = CounterMetricFamily(
            "llm_endpoint_ejections", "Times a pool endpoint was ejected after consecutive failures", labels=labels
        )
        outstanding = GaugeMetricFamily("llm_endpoint_outstanding", "Requests in flight to a pool endpoint",
                                        labels=labels)  # fmt: skip
        ejected = GaugeMetricFamily(
            "llm_endpoint_ejected", "1 while a pool endpoint is skipped: ejected, or down by its health check",
            labels=labels,
        )  # fmt: skip
        for counts in self._endpoints():
            key = [counts.target, counts.endpoint]
            requests.add_metric(key, counts.requests)
            failures.add_metric(key, counts.failures)
            ejections.add_metric(key, counts.ejections)
            outstanding.add_metric(key, counts.outstanding)
            ejected.add_metric(key, float(counts.ejected))
        yield from (requests, failures, ejections, outstanding, ejected)


def install(collector: EngineCollector | PoolCollector) -> None:
    """Read gauges from `collector` (one gateway per process; a new app's replaces the old one of its kind)."""
    old = _collectors.pop(type(collector), None)
    if old is not None:
        REGISTRY.unregister(old)
    REGISTRY.register(collector)
    _collectors[type(collector)] = collector


_collectors: dict[type, EngineCollector | PoolCollector] = {}


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
