"""Metrics after known traffic are exact, each request logs one JSON line without prompt or key, traces
reach an OTLP collector (a real HTTP server started here), and /ready tells loading from ready, and either
from an engine stuck in one step."""

from __future__ import annotations

import gzip
import http.server
import json
import threading

import httpx
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import metrics
from tests.conftest import LOAD_WITHIN, MODEL, free_port, start_server, wait_for

SECRET_KEY = "sk-test-never-log-this-key"
PROMPT_MARKER = "zebra-marker-prompt-text"
# One plain token forced by a +100 bias: every delta then carries exactly one token, so counts are exact.
ONE_TOKEN = {"logit_bias": {"330": 100}, "extra_body": {"ignore_eos": True}}
MAX_TOKENS = 6


class Collector(http.server.ThreadingHTTPServer):
    """A stand-in OTLP/HTTP collector: remembers the path and body of every export it receives."""

    def __init__(self):
        self.exports: list[tuple[str, bytes]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.exports.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A fresh gateway (so counters start at zero) with traces going to a local collector."""
    collector = Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    env = {
        "LLM_LOG_LEVEL": "info",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    server = start_server(tmp_path_factory.mktemp("observed"), env)
    traffic = _send_known_traffic(server)
    try:
        yield server, traffic, collector
    finally:
        server.stop()
        collector.shutdown()


def _send_known_traffic(server) -> dict:
    client = server.client(api_key=SECRET_KEY)
    messages = [{"role": "user", "content": PROMPT_MARKER}]
    usages = []
    for _ in range(2):
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS, extra_headers={"x-request-id": "known-1"},
            **ONE_TOKEN,
        )  # fmt: skip
        usages.append(reply.usage)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, **ONE_TOKEN,
    )  # fmt: skip
    usages.append([chunk for chunk in stream if chunk.usage][0].usage)
    missing = server.post("/v1/chat/completions", json={"model": "nope", "messages": messages})
    assert missing.status_code == 404
    return {"usages": usages}


def _samples(server) -> dict[tuple[str, frozenset], float]:
    text = server.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_after_known_traffic_are_exact(observed):
    server, traffic, _ = observed
    samples = _samples(server)
    chat = {"route": "/v1/chat/completions", "target": "local"}
    local = {"model": MODEL, "target": "local"}
    assert _value(samples, "llm_requests_total", model=MODEL, status="200", **chat) == 3
    assert _value(samples, "llm_requests_total", model="", status="404", **chat) == 1
    assert _value(samples, "llm_request_duration_seconds_count", model=MODEL, **chat) == 3
    prompt = sum(u.prompt_tokens for u in traffic["usages"])
    assert _value(samples, "llm_prompt_tokens_total", **local) == prompt
    assert _value(samples, "llm_completion_tokens_total", **local) == 3 * MAX_TOKENS
    assert _value(samples, "llm_time_to_first_token_seconds_count", **local) == 3
    assert _value(samples, "llm_inter_token_latency_seconds_count", **local) == 3 * (MAX_TOKENS - 1)
    engine = {"model": MODEL, "engine": "llamacpp"}
    assert _value(samples, "llm_model_loaded", **engine) == 1
    assert _value(samples, "llm_model_memory_bytes", **engine) > 50_000_000  # weights and KV cache
    assert _value(samples, "llm_engine_running", **engine) == 0
    assert _value(samples, "llm_engine_waiting", **engine) == 0
    assert _value(samples, "llm_engine_busy_seconds", **engine) == 0  # idle: no step running


def test_routing_counters_for_other_modules():
    """The module API routing code calls: each call shows in the exposition under its labels."""
    metrics.record_fallback("m", "local", "remote")
    metrics.record_retry("remote")
    metrics.record_retry("remote")
    metrics.record_cooldown("remote")
    text = metrics.exposition()[0].decode()
    assert 'llm_fallbacks_total{from_target="local",model="m",to_target="remote"} 1.0' in text
    assert 'llm_retries_total{target="remote"} 2.0' in text
    assert 'llm_cooldowns_total{target="remote"} 1.0' in text


def test_metrics_json_summary(observed):
    server, _, _ = observed
    summary = server.get("/metrics", params={"format": "json"}).json()
    assert summary["model"] == MODEL
    assert summary["device"] == "cpu" and summary["gpu_name"] is None  # CI has no GPU
    assert summary["memory"]["allocated_bytes"] == summary["models"][0]["memory_bytes"] > 0
    assert summary["memory"]["reserved_bytes"] >= summary["memory"]["allocated_bytes"] * 0.5
    assert summary["models"][0]["state"] == "ready"


def test_one_json_log_line_per_request_without_prompt_or_key(observed):
    server, traffic, _ = observed
    log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    known = [line for line in lines if line.get("request_id") == "known-1" and line["logger"] == "gateway.access"]
    assert len(known) == 2
    line = known[0]
    assert line["level"] == "info" and line["status"] == 200 and line["model"] == MODEL
    assert line["target"] == "local" and line["route"] == "/v1/chat/completions"
    assert line["prompt_tokens"] == traffic["usages"][0].prompt_tokens
    assert line["completion_tokens"] == MAX_TOKENS
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    assert PROMPT_MARKER not in log and SECRET_KEY not in log
    # llama.cpp's own output goes through logging too, so every line is JSON, and its chatter (the
    # model's metadata, at llama.cpp's info level) stays hidden unless LLM_LOG_LEVEL=debug
    assert all(line.startswith("{") for line in log.splitlines() if line.strip())
    assert "llama_model_loader" not in log


def _spans(collector) -> list[tuple[str, dict]]:
    """Every span the collector received: its name and its attributes as plain values."""
    spans = []
    for path, body in collector.exports:
        assert path == "/v1/traces", path
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    spans.append((span.name, attributes))
    return spans


def test_traces_reach_the_otlp_collector(observed):
    server, traffic, collector = observed
    server.stop()  # shutting down flushes the span exporter
    spans = _spans(collector)
    known = [attributes for name, attributes in spans if attributes.get("llm.request_id") == "known-1"]
    assert len(known) == 2, spans
    for attributes, usage in zip(known, traffic["usages"]):
        assert attributes["llm.method"] == "POST" and attributes["llm.path"] == "/v1/chat/completions"
        assert (attributes["llm.status"], attributes["llm.model"]) == (200, MODEL)
        assert attributes["llm.completion_tokens"] == MAX_TOKENS
        assert attributes["llm.prompt_tokens"] == usage.prompt_tokens
    names = {name for name, _ in spans}
    assert "POST /v1/chat/completions" in names, names
    assert any(attributes.get("llm.status") == 404 for _, attributes in spans), spans  # the unknown model
    # a span carries what the access log does, never the prompt or the key
    assert not any(PROMPT_MARKER.encode() in body or SECRET_KEY.encode() in body for _, body in collector.exports)


def test_ready_differs_from_health_while_loading(tmp_path):
    server = start_server(tmp_path, {"LLM_CTX": "8192"}, wait_ready=False)
    try:
        seen = set()

        def ready() -> httpx.Response | None:
            answer, health = server.get("/ready"), server.get("/health")
            seen.add((answer.status_code, health.json()["status"]))
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] and health.status_code == 200
            return answer if answer.status_code == 200 else None

        assert wait_for(ready, LOAD_WITHIN, "not ready").json() == {"status": "ready", "model": MODEL}
        assert (503, "loading") in seen and (200, "ok") in seen
    finally:
        server.stop()


def test_ready_waits_for_the_first_public_name_of_a_routing_config(tmp_path):
    """Here the file's first model is served by a provider only: ready at once (a remote target counts as ready,
    reachable or not), while the local model named after it has not loaded at all."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "targets": {"cloud": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m"},
                    "local": {"type": "local"}},
        "models": {"cloud-model": {"targets": ["cloud"]}, MODEL: {"targets": ["local"]}},
    }))  # fmt: skip
    server = start_server(tmp_path, {"LLM_CONFIG": str(config)})
    try:
        ready = server.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready", "model": "cloud-model"})
        assert server.model_state() == "unloaded"  # only the first name's local targets load at start-up
    finally:
        server.stop()


def test_health_and_ready_report_an_engine_inside_one_step_too_long(tmp_path):
    """An engine step that never returns (a GPU hang) is seen only this way: its requests just wait. Here the
    limit is 50 ms and the step a real 500-token embedding, which takes longer on any CPU."""
    server = start_server(tmp_path, {"LLM_STALL_AFTER": "0.05"})
    try:
        embedding = threading.Thread(
            target=lambda: server.client().embeddings.create(model=MODEL, input=[[100 + i for i in range(500)]])
        )
        embedding.start()
        seen = set()
        while embedding.is_alive():
            health, ready = server.get("/health"), server.get("/ready")
            seen.add((health.status_code, health.json()["status"], ready.status_code, ready.json()["status"]))
            if health.json()["status"] == "stalled":
                assert health.json()["models"][0]["state"] == "stalled"
                assert health.json()["models"][0]["busy_s"] > 0.05
        embedding.join()
        assert (503, "stalled", 503, "stalled") in seen, seen
        after = server.get("/health")
        assert after.status_code == 200 and after.json()["status"] == "ok"
        assert server.get("/ready").json()["status"] == "ready"
    finally:
        server.stop()
