"""The one FastAPI app `kiln serve` runs: store API now; gateway, OTLP intake and dashboard join it.

The app never owns the store it is given (whoever opened it closes it), so tests and
in-process users can serve an existing store and keep using it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from agentkiln.dashboard.routes import PUBLIC_PATHS as DASHBOARD_PUBLIC_PATHS
from agentkiln.dashboard.routes import build_dashboard_router
from agentkiln.engine.weight_roots import WeightsPolicy
from agentkiln.engine.weight_sync import ModelSync
from agentkiln.gateway.agent_names import AgentNames, AgentNamesSpec
from agentkiln.gateway.router import install_gateway
from agentkiln.production.canary import CanaryController
from agentkiln.production.capture import CaptureConfig, ProductionCapture, purge_forever
from agentkiln.server.auth import AttemptTokens, AuthMiddleware, document_security
from agentkiln.server.canary_routes import build_canary_router
from agentkiln.server.canary_store_routes import router as canary_store_router
from agentkiln.server.engine_routes import build_engine_status_router
from agentkiln.server.errors import (
    BodyLimitMiddleware,
    UnexpectedErrorMiddleware,
    install_error_handlers,
)
from agentkiln.server.feedback_routes import router as feedback_router
from agentkiln.server.host_check import TrustedHostMiddleware
from agentkiln.server.load_shedding import MAX_IN_FLIGHT, LoadShedMiddleware
from agentkiln.server.idempotency import IdempotencyMiddleware, RecentSpans
from agentkiln.server.metrics import install_metrics
from agentkiln.server.otlp import build_otlp_router
from agentkiln.server.response_store_routes import router as response_store_router
from agentkiln.server.store_routes import router as store_router
from agentkiln.store.base import Store

log = logging.getLogger(__name__)


@dataclass
class SweepStats:
    """What this server's background sweep did, for /metrics: replicas on one store each report their own
    (on PostgreSQL one sweeps at a time and each attempt is ended once, so their counts never overlap)."""

    runs: int = 0
    changed_attempts: int = 0


async def sweep_timeouts(store: Store, interval_s: float, stats: SweepStats | None = None) -> None:
    """Runs the store's timeout/heartbeat sweep forever; a failing sweep is logged, never fatal."""
    stats = stats if stats is not None else SweepStats()
    while True:
        await asyncio.sleep(interval_s)
        try:
            changed = await store.check_timeouts()
            stats.runs += 1
            stats.changed_attempts += len(changed)
            if changed:
                log.info("timeout sweep changed %d attempt(s)", len(changed))
        except Exception:
            log.exception("timeout sweep failed")


def create_app(
    store: Store,
    *,
    api_key: str | None = None,
    runner_key: str | None = None,
    feedback_key: str | None = None,
    max_body_bytes: int = 16_000_000,
    max_in_flight: int = MAX_IN_FLIGHT,
    sweep_interval_s: float = 1.0,
    public_paths: Iterable[str] = ("/health",),
    engine: Any = None,
    model_sync_interval_s: float = 0.25,
    allowed_hosts: Iterable[str] | None = None,
    weights_policy: WeightsPolicy | None = None,
    capture: CaptureConfig | None = None,
    canary_interval_s: float = 5.0,
    agent_names: AgentNamesSpec = None,
) -> FastAPI:
    """Build the server around `store`. sweep_interval_s <= 0 turns the background sweep off.

    `api_key` is the admin key; `runner_key` (needs `api_key`) is the runners' narrower key;
    agents get per-attempt tokens (see server/auth.py). `capture` records plain /v1 calls on
    production sessions (agentkiln/production/capture.py; default off). The active canary is
    decided by its rule every `canary_interval_s` (<= 0: only by hand; production/canary.py).
    `agent_names` ({regex: name} or (regex, name) pairs) names gateway calls by their system prompt
    (gateway/agent_names.py); a bad rule raises ValueError here.
    """
    if runner_key and not api_key:
        raise ValueError("a runner key needs an admin API key beside it")
    if feedback_key and not api_key:  # `feedback_key`: a front end's key that may only post feedback
        raise ValueError("a feedback key needs an admin API key beside it")
    names = AgentNames.of(agent_names)  # a bad rule fails before anything starts

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[None]] = []
        if sweep_interval_s > 0:
            sweep = sweep_timeouts(store, sweep_interval_s, app.state.sweep_stats)
            tasks.append(asyncio.create_task(sweep, name="kiln-timeout-sweep"))
        # The engine may be attached after create_app (kiln serve does): look it up at start-up.
        if app.state.engine is not None and model_sync_interval_s > 0:
            app.state.model_sync = ModelSync(store, app.state.engine, model_sync_interval_s, app.state.weights_policy)
            tasks.append(asyncio.create_task(app.state.model_sync.run_forever(), name="kiln-model-sync"))
        if app.state.production.config.enabled and app.state.production.config.retention_days is not None:
            tasks.append(asyncio.create_task(purge_forever(store, app.state.production), name="kiln-retention"))
        if canary_interval_s > 0:
            app.state.canary_controller = CanaryController(store, canary_interval_s)
            tasks.append(asyncio.create_task(app.state.canary_controller.run_forever(), name="kiln-canary"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="AgentKiln", version="0.1.0", lifespan=lifespan)
    app.state.store = store
    app.state.sweep_stats = SweepStats()
    app.state.recent_spans = RecentSpans()  # routes that write spans (store API, OTLP intake) share it
    app.state.engine = engine  # the gateway reads it per request, so it may also be set later
    app.state.model_sync = None
    app.state.canary_controller = None
    app.state.production = ProductionCapture(capture or CaptureConfig())  # the gateway reads it per call
    app.state.agent_names = names  # the gateway reads it per call
    # Which published weights may be loaded (default: only under $KILN_WEIGHTS_ROOTS; see weight_roots).
    app.state.weights_policy = weights_policy if weights_policy is not None else WeightsPolicy.build()
    app.state.attempt_tokens = AttemptTokens.for_key(api_key)  # the dequeue/start routes mint one per attempt
    install_error_handlers(app)
    app.include_router(store_router)
    app.include_router(feedback_router)
    app.include_router(canary_store_router)
    app.include_router(response_store_router)
    app.include_router(build_otlp_router())
    app.include_router(build_engine_status_router())
    app.include_router(build_canary_router())
    app.include_router(build_dashboard_router())
    install_metrics(app)  # /metrics, and the gateway latency histogram
    public_paths = (*public_paths, *DASHBOARD_PUBLIC_PATHS)  # the dashboard's page shells hold no data
    install_gateway(app)  # ahead of every other route

    # Added innermost first: a request passes error catcher -> auth -> body limit -> idempotency -> routes.
    # Answers to retried writes: in the store's database when replicas share it, else in this process.
    app.add_middleware(IdempotencyMiddleware, cache=store.idempotency_cache())
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(
            AuthMiddleware,
            admin_key=api_key,
            runner_key=runner_key,
            feedback_key=feedback_key,
            tokens=app.state.attempt_tokens,
            public_paths=public_paths,
        )
        document_security(app, public_paths)
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(LoadShedMiddleware, max_in_flight=max_in_flight)  # 503 + Retry-After past the bound
    if allowed_hosts is not None:  # outermost: a rebinding page's request never reaches a route
        app.add_middleware(TrustedHostMiddleware, allowed=allowed_hosts)
    return app
