"""Running the app: `serve()` for `kiln serve`, `ServerThread` for tests and in-process use.

`serve()` owns what it opens (store, engine): it starts the engine and closes both in the
app's lifespan, so a Ctrl-C or SIGTERM still closes the SQLite file cleanly. `ServerThread`
serves an app someone else owns on a loopback port in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import uvicorn
from fastapi import FastAPI

from agentkiln.engine.weight_roots import DEFAULT_MAX_WEIGHT_SETS, WeightsPolicy
from agentkiln.gateway.agent_names import AgentNames, AgentNamesSpec
from agentkiln.production.capture import CaptureConfig
from agentkiln.server.app import create_app
from agentkiln.server.host_check import LOOPBACK_HOSTS, check_bind
from agentkiln.server.http_protocol import MAX_HEAD_BYTES, BoundedHttpToolsProtocol
from agentkiln.store.base import Store

log = logging.getLogger(__name__)
DEFAULT_WEIGHTS_ROOT = "runs"  # where `kiln train` writes adapters when started in the same folder


# How the HTTP server bounds what clients can hold (uvicorn's settings; see uvicorn_config):
# - Requests in flight are bounded by load_shedding.LoadShedMiddleware (1,024; then 503 with
#   Retry-After, the connection kept). uvicorn's limit_concurrency is its bound on connections + tasks
#   (past it: a plain 503 and the connection closed); it counts idle keep-alive connections, which a
#   thousand runners hold, so it is set from the file-descriptor limit (raised to its hard limit at
#   start) rather than to the request bound: a flood still cannot exhaust descriptors.
# - KEEP_ALIVE_S 20: idle connections close after 20 s, longer than clients pool them (httpx: 5 s),
#   so the server never closes a connection a client is about to reuse.
# - MAX_HEAD_BYTES 64 KiB: the bound on a request head (request line + headers), kept by
#   http_protocol.BoundedHttpToolsProtocol (httptools' speed, h11's bound: 431 past it).
# - BACKLOG 1024: connections the kernel queues before accept; beyond it clients retry.
# - GRACEFUL_SHUTDOWN_S 10: a stop waits this long for requests in flight (long polls end
#   within MAX_WAIT_S = 30 s), then closes them, so SIGTERM never hangs.
LIMIT_CONCURRENCY_MAX = 16_384
FD_HEADROOM = 256  # descriptors kept for the store, the engine, logs and the upstream client


def connection_limit() -> int:
    """uvicorn's limit_concurrency: as many connections as the descriptor limit allows (raised to hard)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = LIMIT_CONCURRENCY_MAX + FD_HEADROOM
        if hard != resource.RLIM_INFINITY:
            want = min(hard, want)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    except (ImportError, ValueError, OSError):  # no resource module (Windows) or not allowed
        return 1024
    return max(64, min(LIMIT_CONCURRENCY_MAX, soft - FD_HEADROOM))


KEEP_ALIVE_S = 20
BACKLOG = 1024
GRACEFUL_SHUTDOWN_S = 10


def uvicorn_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """uvicorn.Config with the bounds above (kwargs override them)."""
    settings: dict[str, Any] = {
        "lifespan": "on",
        "http": BoundedHttpToolsProtocol,
        "limit_concurrency": connection_limit(),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,  # if a caller picks http="h11"
        "backlog": BACKLOG,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    return uvicorn.Config(app, **{**settings, **kwargs})


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def open_store_async(store_url: str) -> Store:
    """`agentkiln.store.open_store` may be sync or async; accept both."""
    from agentkiln.store import open_store

    store = await _maybe_await(open_store(store_url))
    opener = getattr(store, "open", None)  # a database store connects and migrates now: a bad URL fails at start
    if opener is not None:
        await opener()
    return store


async def build_engine_async(spec: str) -> Any:
    """None for spec "none"; otherwise the engine factory is imported only now (it pulls in torch)."""
    if not spec or spec.lower() == "none":
        return None
    from agentkiln.engine.factory import build_engine

    return await _maybe_await(build_engine(spec))


def own_resources(app: FastAPI, store: Store, engine: Any = None) -> None:
    """Make the app's lifespan start `engine` and close `engine` and `store` when the server stops."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        if engine is not None:
            await engine.start()
        try:
            async with inner(a) as state:
                yield state
        finally:
            if engine is not None:
                with contextlib.suppress(Exception):
                    await engine.close()
            await store.close()
            log.info("store closed")

    app.router.lifespan_context = lifespan


async def serve_async(
    store_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 4747,
    api_key: Optional[str] = None,
    runner_key: Optional[str] = None,
    feedback_key: Optional[str] = None,
    engine_spec: str = "none",
    max_body_bytes: int = 16_000_000,
    sweep_interval_s: float = 1.0,
    log_level: str = "info",
    weights_roots: Sequence[str | Path] = (),
    max_weight_sets: int = DEFAULT_MAX_WEIGHT_SETS,
    max_tokens_default: Optional[int] = None,
    capture: Optional[CaptureConfig] = None,
    canary_interval_s: float = 5.0,
    agent_names: AgentNamesSpec = None,
) -> None:
    """`max_tokens_default` bounds the answer of a gateway client that sends no token limit (None:
    until a stop or the model's context limit).

    `weights_roots` (plus $KILN_WEIGHTS_ROOTS; ./runs when both are empty) are the only folders
    published weights are loaded from; the hub is never reached (offline mode). `agent_names` names
    gateway calls by their system prompt (gateway/agent_names.py)."""
    check_bind(host, api_key)  # before anything is opened: a refused start leaves nothing behind
    names = AgentNames.of(agent_names)  # a bad rule fails before the store and engine are opened
    # Nothing the server loads may come from the hub (a published adapter_path could name a hub id).
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    weights_policy = WeightsPolicy.build(weights_roots, max_weight_sets, default=DEFAULT_WEIGHTS_ROOT)
    store = await open_store_async(store_url)
    try:
        engine = await build_engine_async(engine_spec)
    except BaseException:
        await store.close()
        raise
    app = create_app(
        store,
        api_key=api_key,
        runner_key=runner_key,
        feedback_key=feedback_key,
        max_body_bytes=max_body_bytes,
        sweep_interval_s=sweep_interval_s,
        # Without a key only loopback clients are trusted; with one the key is the check.
        allowed_hosts=LOOPBACK_HOSTS if api_key is None else None,
        weights_policy=weights_policy,
        capture=capture,
        canary_interval_s=canary_interval_s,
        agent_names=names,
    )
    log.info("published weights load only from %s", ", ".join(str(r) for r in weights_policy.roots))
    app.state.engine = engine
    app.state.max_tokens_default = max_tokens_default  # read per request by the gateway
    own_resources(app, store, engine)
    config = uvicorn_config(app, host=host, port=port, log_level=log_level)
    # What start-up allocated (model, libraries, app) lives as long as the server: keep it out of
    # the garbage collector's full passes, which otherwise stall a request now and then.
    gc.collect()
    gc.freeze()
    await uvicorn.Server(config).serve()


def serve(
    store_url: str, host: str = "127.0.0.1", port: int = 4747, api_key: Optional[str] = None, **kwargs: Any
) -> None:
    """Blocking: serve the store at `store_url` (path, sqlite:// or memory:// as open_store accepts) until signalled."""
    asyncio.run(serve_async(store_url, host=host, port=port, api_key=api_key, **kwargs))


class ServerThread:
    """Serves `app` from a daemon thread: `url = ServerThread(app).start()`, later `.stop()`.

    port=0 picks a free port; the socket is bound before the thread starts, so the returned
    URL is valid the moment start() returns (no port race with other tests).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[socket.socket] = None
        self.url: Optional[str] = None

    def start(self, timeout: float = 30.0) -> str:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(BACKLOG)
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn_config(self.app, log_level=self.log_level, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        give_up = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self.url = f"http://{host}:{self.port}"
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> "ServerThread":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
