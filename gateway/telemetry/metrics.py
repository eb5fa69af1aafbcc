"""Prometheus metrics, served at GET /metrics. Every metric the gateway exports is declared here.

Other modules record through this module's functions, never through prometheus_client directly, so
names and labels stay in one place:
- `observe_request(record)`: once per HTTP request (the access middleware calls it).
- `observe_first_token(record)`, `token_gap_observer(record)`: while tokens stream.
- `record_fallback(model, from_target, to_target)`, `record_retry(target)`, `record_cooldown(target)`:
  for the routing layer (fallback chains, retries, circuit breakers).
- `record_model_event(model, event)`: loads and unloads (with the reason) from the model lifecycle.
Engine gauges (queue depth, running requests, loaded models and their memory) are read from the
engines at scrape time by `EngineCollector`, so they are never stale.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
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
}


def install(collector: EngineCollector) -> None:
    """Read engine gauges from `collector` (one gateway per process; a new app replaces the old one)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    REGISTRY.register(collector)
    _collector = collector


_collector: EngineCollector | None = None


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
