"""`GET /metrics` in Prometheus text (prometheus-client): gateway latency, tokens, queue, attempts, engine, sweeps.

The gateway's hot path pays for one histogram observe per call (a timing middleware on the
gateway routes only). Everything else is read when Prometheus scrapes: the engine's own
counters (tokens in/out, batch size, weight loads) and the store's counts (queue depth,
attempts by status and failure kind), so no request ever queries the store for metrics.
Each app has its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkiln.dashboard.queries import StoreSummary, store_summary

METRICS_PATH = "/metrics"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_APIS = (("/chat/completions", "chat.completions"), ("/responses", "responses"), ("/models", "models"))


def gateway_api(path: str) -> str | None:
    """Which gateway API a path calls (plain /v1/... or a per-attempt route), None for any other path."""
    if not path.startswith(("/v1/", "/rollout/")):
        return None
    return next((name for suffix, name in _APIS if path.endswith(suffix)), None)


class GatewayTimingMiddleware:
    """Observes each gateway call's duration (to the last byte of its answer, streams included)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = gateway_api(scope.get("path", "")) if scope["type"] == "http" else None
        if api is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = [500]

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.histogram.labels(api, str(code[0])).observe(time.perf_counter() - start)

        await self.app(scope, receive, timed_send)


class _ScrapeTimeCollector:
    """The engine's counters and the store's counts, read at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.summary: StoreSummary | None = None  # set by the /metrics route just before generating

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the engine attached

    def _engine(self) -> Iterator[Metric]:
        engine = getattr(self.app.state, "engine", None)
        stats = getattr(engine, "stats", None)
        if stats is None:
            return
        counters = [
            (
                "kiln_engine_prompt_tokens",
                "prompt tokens in (run through the model or from the prefix cache)",
                stats.prefill_tokens + stats.prefix_hit_tokens,
            ),
            ("kiln_engine_generated_tokens", "tokens generated (out)", stats.tokens),
            (
                "kiln_engine_prefix_hit_tokens",
                "prompt tokens whose KV came from the prefix cache",
                stats.prefix_hit_tokens,
            ),
            ("kiln_engine_sequences", "sequences finished", stats.sequences),
            ("kiln_engine_decode_steps", "batched decode forward passes", stats.decode_steps),
            ("kiln_engine_weight_loads", "weight sets loaded (published versions swapped in)", stats.weight_swaps),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("kiln_engine_batch_size_max", "most sequences decoded together", value=stats.max_active)
        yield GaugeMetricFamily(
            "kiln_engine_batch_size_mean",
            "generated tokens per decode step since start (the mean decode batch size)",
            value=stats.tokens / stats.decode_steps if stats.decode_steps else 0.0,
        )
        loaded = GaugeMetricFamily("kiln_engine_info", "the weights the engine serves", labels=["model", "version"])
        loaded.add_metric([str(getattr(engine, "model_name", "")), str(engine.model_version)], 1)
        yield loaded

    def _store(self) -> Iterator[Metric]:
        s = self.summary
        if s is None:
            return
        yield GaugeMetricFamily(
            "kiln_queue_depth", "rollouts waiting for a runner (queuing + requeuing)", value=s.queue_depth
        )
        rollouts = GaugeMetricFamily("kiln_rollouts", "rollouts in the store by status", labels=["status"])
        for status, n in sorted(s.rollouts_by_status.items()):
            rollouts.add_metric([status], n)
        yield rollouts
        attempts = GaugeMetricFamily("kiln_attempts", "attempts in the store by status", labels=["status"])
        for status, n in sorted(s.attempts_by_status.items()):
            attempts.add_metric([status], n)
        yield attempts
        failures = GaugeMetricFamily(
            "kiln_attempt_failures", "failed attempts in the store by failure kind", labels=["kind"]
        )
        for kind, n in sorted(s.failures_by_kind.items()):
            failures.add_metric([kind], n)
        yield failures
        yield GaugeMetricFamily(
            "kiln_rollouts_per_second", "rollouts finished per second over the last minute", value=s.rollouts_per_s
        )

    def _sweep(self) -> Iterator[Metric]:
        stats = getattr(self.app.state, "sweep_stats", None)  # app.SweepStats (absent: an app without one)
        if stats is None:
            return
        yield CounterMetricFamily("kiln_sweep_runs", "timeout sweeps this server ran", value=stats.runs)
        yield CounterMetricFamily(
            "kiln_sweep_changed_attempts",
            "attempts this server's background sweeps ended (timeout, unresponsive); on one store, replicas' "
            "counts add up without overlap (the store's own sweeps inside dequeue/wait calls are not counted)",
            value=stats.changed_attempts,
        )

    def collect(self) -> Iterator[Metric]:
        yield from self._engine()
        yield from self._store()
        yield from self._sweep()


class Metrics:
    """One app's registry: the gateway histogram plus the scrape-time collector."""

    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry()
        self.gateway_latency = Histogram(
            "kiln_gateway_request_duration_seconds",
            "gateway call duration, to the last byte of the answer",
            ["api", "code"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.scrape = _ScrapeTimeCollector(app)
        self.registry.register(self.scrape)  # type: ignore[arg-type]

    async def render(self, store: Any) -> bytes:
        self.scrape.summary = await store_summary(store)
        return generate_latest(self.registry)


def install_metrics(app: FastAPI) -> Metrics:
    """Add `/metrics` and the gateway timing middleware (innermost: it times the route, not auth)."""
    metrics = app.state.metrics = Metrics(app)
    app.add_middleware(GatewayTimingMiddleware, histogram=metrics.gateway_latency)
    router = APIRouter(include_in_schema=False)

    @router.get(METRICS_PATH)
    async def prometheus(request: Request) -> Response:
        body = await request.app.state.metrics.render(request.app.state.store)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return metrics
