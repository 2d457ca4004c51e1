"""OpenTelemetry in the agent process: framework spans go to the kiln server's /v1/traces.

One TracerProvider serves every attempt of the process; a span processor stamps each span
with `kiln.rollout_id` / `kiln.attempt_id` of the attempt that is current when the span
starts (see context.py), so concurrent attempts in one process stay apart. The worker
force-flushes the provider at the end of each attempt (Runner(otel=True) wires this up).
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from agentkiln.protocol import OTLP_TRACES_PATH, SpanAttrs, auth_headers
from agentkiln.runner import context

logger = logging.getLogger(__name__)



class KilnSpanProcessor(SpanProcessor):
    """Adds the current kiln attempt's ids to every span that starts inside a rollout."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        ctx = context.current()
        if ctx is None:
            return
        span.set_attribute(SpanAttrs.rollout_id, ctx.rollout_id)
        span.set_attribute(SpanAttrs.attempt_id, ctx.attempt_id)

    def on_end(self, span: ReadableSpan) -> None:
        return None


class _OnlyKilnSpans(SpanExporter):
    """Drops spans started outside any rollout (the server would reject them with 400)."""

    def __init__(self, inner: SpanExporter):
        self.inner = inner

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        keep = [s for s in spans if (s.attributes or {}).get(SpanAttrs.rollout_id)]
        return self.inner.export(keep) if keep else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def otlp_exporter(server_url: str, api_key: str | None = None) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    headers = auth_headers(api_key) or None
    return OTLPSpanExporter(endpoint=server_url.rstrip("/") + OTLP_TRACES_PATH, headers=headers)


def setup_tracing(
    server_url: str,
    *,
    api_key: str | None = None,
    service_name: str = "kiln-agent",
    set_global: bool = True,
    exporter: SpanExporter | None = None,
    batch: bool = True,
) -> TracerProvider:
    """Create (and by default install globally) a provider exporting attempt-tagged spans to the server.

    `exporter` replaces the OTLP/HTTP exporter (tests). The global provider can only be set
    once per process; later calls return a provider that is not global and log a warning.
    """
    from opentelemetry import trace

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(KilnSpanProcessor())
    inner = _OnlyKilnSpans(exporter or otlp_exporter(server_url, api_key))
    provider.add_span_processor(BatchSpanProcessor(inner) if batch else SimpleSpanProcessor(inner))
    if set_global:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            logger.warning("a global TracerProvider is already set; adding kiln processors to it instead")
            current.add_span_processor(KilnSpanProcessor())
            current.add_span_processor(BatchSpanProcessor(inner) if batch else SimpleSpanProcessor(inner))
            return current
        trace.set_tracer_provider(provider)
    return provider


def attempt_resource_attributes(rollout_id: str, attempt_id: str) -> dict[str, str]:
    """Resource attributes tying a whole process's spans to one attempt (one process per attempt)."""
    return {SpanAttrs.rollout_id: rollout_id, SpanAttrs.attempt_id: attempt_id}
