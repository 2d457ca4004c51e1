"""Who may call what: an admin key, a runner key, and per-attempt tokens minted at dequeue.

- admin (`--api-key`): everything: resources, enqueue, cancel, queries, configuration.
- runner (`--runner-key`; without one the admin key is the only key): the work loop:
  dequeue, heartbeats, its attempts' status and spans, reading rollouts and resources,
  the gateway. Never publishes resources, enqueues, cancels or sweeps.
- attempt token (minted by the dequeue/start routes, handed to the agent as its OpenAI key):
  that attempt's gateway calls and span writes only, and only while the attempt runs. It posts
  no feedback: an agent reports its own outcome as reward spans; users' judgements come from the
  front end's feedback key.
- feedback (`--feedback-key`, for a front end shipped to users): `POST /api/v1/feedback` and
  nothing else, so a leaked key can add judgements but read nothing. Runners may post feedback
  too (a runner-side evaluator); reading it back is the admin's.

Tokens are stateless HMACs over (rollout id, attempt id) keyed from the admin key, so every
replica that shares the key accepts them without a table, and a finished attempt's token
is refused by the liveness check. Without any key the server is loopback-only (see
host_check) and every caller is admin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from agentkiln.models import SpanIn
from agentkiln.protocol import (
    ADMIN,
    API_PREFIX,
    FEEDBACK_PATH,
    LLM_ONLY_PREFIX,
    OTLP_TRACES_PATH,
    Headers,
    Principal,
    Role,
    SpanNames,
)
from agentkiln.server.errors import send_error
from agentkiln.store.base import NotFoundError, StoreError

_API_KEY_HEADER = Headers.api_key.encode()
TOKEN_PREFIX = "kat_"  # "kiln attempt token": tells a token from a key at a glance (and to secret scanners)


class AuthError(StoreError):
    status_code = 401


class ForbiddenError(StoreError):
    status_code = 403


# --------------------------------------------------------------------------- attempt tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AttemptTokens:
    """Mints and verifies per-attempt tokens: `kat_<payload>.<hmac-sha256>`."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def for_key(cls, admin_key: str | None) -> AttemptTokens:
        """Keyed from the admin key (replicas sharing it agree); random per process without one."""
        if admin_key is None:
            return cls(os.urandom(32))
        return cls(hmac.new(admin_key.encode(), b"kiln attempt tokens v1", hashlib.sha256).digest())

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def mint(self, rollout_id: str, attempt_id: str) -> str:
        payload = _b64(json.dumps([rollout_id, attempt_id], separators=(",", ":")).encode())
        return f"{TOKEN_PREFIX}{payload}.{self._sign(payload)}"

    def verify(self, token: str) -> tuple[str, str] | None:
        """(rollout_id, attempt_id) of a genuine token, else None."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        payload, _, signature = token[len(TOKEN_PREFIX) :].partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            ids = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not (isinstance(ids, list) and len(ids) == 2 and all(isinstance(i, str) for i in ids)):
            return None
        return ids[0], ids[1]


# --------------------------------------------------------------------------- route policy

_ID = r"[^/]+"
# Admin-only operations (the runner key gets everything else).
_ADMIN_ONLY = [
    (method, re.compile(f"^{API_PREFIX}{path}$"))
    for method, path in [
        ("POST", "/resources"),
        ("POST", "/rollouts"),
        ("POST", "/rollouts/batch"),
        ("POST", "/rollouts/start"),
        ("POST", "/rollouts/wait"),
        ("GET", "/rollouts"),
        ("PATCH", f"/rollouts/{_ID}"),
        ("POST", f"/rollouts/{_ID}/cancel"),
        ("POST", "/check-timeouts"),
        ("GET", "/dashboard/.+"),  # the dashboard reads every rollout, like the rollout list
        ("POST", f"/canaries/{_ID}/(?:promote|rollback)"),  # deploys or withdraws a version
        ("GET", f"/canaries/{_ID}/stats"),  # aggregates every user's feedback
        ("POST", "/canaries"),  # starts serving a candidate to users
        ("POST", f"/canaries/{_ID}/decisions"),
        ("GET", "/feedback"),  # users' comments and corrections: read by the operator only
        ("GET", f"/sessions/{_ID}"),
        ("POST", "/purge-production"),
        ("POST", "/stored-responses"),  # whole conversations of every attempt (response_store_routes)
        ("GET", f"/stored-responses/{_ID}"),
        ("DELETE", f"/stored-responses/{_ID}"),
        ("POST", "/purge-stored-responses"),
    ]
]
_ATTEMPT_GATEWAY = re.compile(
    rf"^/rollout/(?P<rollout_id>{_ID})/attempt/(?P<attempt_id>{_ID})(?:/agent/{_ID})?/v1/"
    r"(?:chat/completions|responses(?:/[^/]+(?:/input_items)?)?|models)$"
)
# Stored responses are served to an attempt token only when its own attempt made them (gateway/responses/state.py).
_PLAIN_GATEWAY = re.compile(r"^/v1/(?:chat/completions|responses(?:/[^/]+(?:/input_items)?)?|models)$")
_NEEDS = {
    Role.runner: "that needs the admin key",
    Role.attempt: "an attempt token reaches only its own attempt's gateway and spans",
    Role.feedback: f"a feedback key may only POST {FEEDBACK_PATH}",
}
_SPAN_WRITES = {("POST", API_PREFIX + "/spans"), ("POST", OTLP_TRACES_PATH)}


def allowed(principal: Principal, method: str, path: str) -> bool:
    """Whether `principal` may call `method path` at all (span ownership is checked by the routes)."""
    if principal.role == Role.admin:
        return True
    if principal.role == Role.runner:
        return not any(m == method and rx.match(path) for m, rx in _ADMIN_ONLY)
    if principal.role == Role.feedback:
        return (method, path) == ("POST", FEEDBACK_PATH)
    if (method, path) in _SPAN_WRITES or _PLAIN_GATEWAY.match(path):
        return True  # the gateway records a plain-/v1 call on the token's attempt
    match = _ATTEMPT_GATEWAY.match(path)
    return match is not None and (match["rollout_id"], match["attempt_id"]) == (
        principal.rollout_id,
        principal.attempt_id,
    )


def check_span_writes(principal: Principal, spans: Sequence[SpanIn]) -> None:
    """403 unless the caller may write these spans.

    LLM-call records (the span name and every `kiln.llm.*` attribute) become training data,
    so only the gateway (in process) and the admin (importing traces) write them; an
    attempt token writes only its own attempt's spans.
    """
    if principal.role == Role.admin:
        return
    for span in spans:
        if span.name == SpanNames.llm_call or any(key.startswith(LLM_ONLY_PREFIX) for key in span.attributes):
            raise ForbiddenError(
                f"span {span.name!r}: LLM-call spans and {LLM_ONLY_PREFIX}* attributes are written by the gateway only"
            )
        if principal.role == Role.attempt and (span.rollout_id, span.attempt_id) != (
            principal.rollout_id,
            principal.attempt_id,
        ):
            raise ForbiddenError(
                f"span {span.name!r} names attempt {span.attempt_id!r} of rollout {span.rollout_id!r}; "
                "this token writes only its own attempt's spans"
            )


def check_attempt_holder(principal: Principal, attempt: Any, worker_id: str | None) -> None:
    """403 unless a runner updates an attempt it holds: the worker the attempt was handed to names itself."""
    if principal.role != Role.runner or attempt.worker_id is None or worker_id == attempt.worker_id:
        return
    raise ForbiddenError(
        f"attempt {attempt.attempt_id} is held by worker {attempt.worker_id!r}; a runner updates only the "
        "attempts it holds (send its worker_id)"
    )


# --------------------------------------------------------------------------- middleware


def presented_credential(scope: Scope) -> str | None:
    """`Authorization: Bearer <x>` or `X-Api-Key: <x>`."""
    for name, value in scope.get("headers", ()):
        if name == _API_KEY_HEADER:
            return value.strip().decode("latin-1")
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode("latin-1")
    return None


class AuthMiddleware:
    """Identifies the caller of every request (401 if it cannot), then applies the route policy (403).

    An attempt token is also refused once its attempt has ended: one attempt-status read, the
    same the gateway does for every recorded call.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        admin_key: str,
        runner_key: str | None = None,
        feedback_key: str | None = None,
        tokens: AttemptTokens,
        public_paths: Iterable[str] = ("/health",),
    ) -> None:
        self.app = app
        self.keys = [(admin_key.encode(), ADMIN)]
        if runner_key:
            self.keys.append((runner_key.encode(), Principal(Role.runner)))
        if feedback_key:
            self.keys.append((feedback_key.encode(), Principal(Role.feedback)))
        self.tokens = tokens
        self.public_paths = frozenset(public_paths)

    async def _identify(self, scope: Scope, presented: str) -> Principal:
        raw = presented.encode("latin-1")
        for key, principal in self.keys:
            if hmac.compare_digest(raw, key):
                return principal
        ids = self.tokens.verify(presented)
        if ids is None:
            raise AuthError("invalid API key or attempt token")
        rollout_id, attempt_id = ids
        store = scope["app"].state.store
        try:
            status = (await store.attempt_statuses(rollout_id)).get(attempt_id)
        except NotFoundError:
            status = None
        if status is None:
            raise AuthError("attempt token names an attempt this server does not know")
        if status.finished:
            raise AuthError(f"attempt token expired: attempt {attempt_id} is {status.value}")
        return Principal(Role.attempt, rollout_id, attempt_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.public_paths:
            await self.app(scope, receive, send)
            return
        presented = presented_credential(scope)
        try:
            if presented is None:
                raise AuthError("missing API key")
            principal = await self._identify(scope, presented)
        except AuthError as exc:
            if scope["type"] != "http":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send_error(
                send,
                401,
                "Unauthorized",
                f"{exc}: send 'Authorization: Bearer <key or attempt token>' or 'X-Api-Key: <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if not allowed(principal, method, path):
            need = _NEEDS[principal.role]
            await send_error(
                send, 403, "Forbidden", f"a {principal.role.value} credential may not call {method} {path}: {need}"
            )
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def document_security(app: Any, public_paths: Iterable[str]) -> None:
    """Declare the credentials in the OpenAPI schema (bearer or X-Api-Key) on every non-public route,
    so clients and API testers (schemathesis' ignored_auth check) know which calls need one."""
    public = frozenset(public_paths)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "admin key, runner key or attempt token"},
                "apiKey": {"type": "apiKey", "in": "header", "name": Headers.api_key},
            }
            for path, operations in schema.get("paths", {}).items():
                if path in public:
                    continue
                for operation in operations.values():
                    if isinstance(operation, dict):
                        operation["security"] = [{"bearer": []}, {"apiKey": []}]
        return app.openapi_schema

    app.openapi = openapi

