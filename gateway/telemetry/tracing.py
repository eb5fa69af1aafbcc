"""Optional OpenTelemetry traces: one span per request, exported over OTLP/HTTP.

On when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and the `otel` extra is installed; the OpenTelemetry SDK
reads its usual variables (endpoint, headers, service name) itself. Without either, `span` costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)
_provider = None
_tracer = None


def configure() -> None:
    global _provider, _tracer
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                    "pip install 'local-llm-gateway[otel]'; tracing stays off")  # fmt: skip
        return
    service = os.environ.get("OTEL_SERVICE_NAME", "local-llm-gateway")
    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("gateway")
    log.info("exporting traces to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])


def shutdown() -> None:
    """Flush spans still buffered (at server shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def span(record) -> contextlib.AbstractContextManager:
    """A server span around one request, with the record's fields as attributes once it is done."""
    return _NO_SPAN if _tracer is None else _span(record)


_NO_SPAN = contextlib.nullcontext()  # tracing off: no generator and context manager made per request


@contextlib.contextmanager
def _span(record):
    with _tracer.start_as_current_span(f"{record.method} {record.path}") as current:
        try:
            yield
        finally:
            for key, value in record.log_fields().items():
                if value is not None:
                    current.set_attribute(f"llm.{key}", value)
            current.set_attribute("llm.request_id", record.request_id)
