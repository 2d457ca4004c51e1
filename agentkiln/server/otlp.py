"""OTLP/HTTP trace intake (`POST /v1/traces`): framework spans from any language join the attempt's trace.

Agents instrumented with OpenTelemetry (LangChain, OpenAI Agents SDK, a Node program...)
export here with the standard OTLP exporter, protobuf or JSON. Each span must say which
attempt it belongs to: span or resource attributes `kiln.rollout_id` / `kiln.attempt_id`
(the runner's tracing helper and sidecar env set them), or the headers
X-Kiln-Rollout-Id / X-Kiln-Attempt-Id. With only a rollout id the latest attempt is used.
Spans are stored as SpanIn: times in seconds, attributes as plain JSON. GenAI evaluation events
(`gen_ai.evaluation.result`) also become feedback (otlp_feedback); a span naming no rollout is
accepted when it carries only such verdicts (an evaluator's own span) and is not stored.
"""

from __future__ import annotations

import base64
import inspect
import logging
import math
import re
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from agentkiln.models import MAX_NAME_LENGTH, FeedbackIn, SpanEvent, SpanIn, SpanStatus, now
from agentkiln.protocol import Headers, Role, SpanAttrs, principal_of
from agentkiln.server.auth import check_span_writes
from agentkiln.server.errors import error_responses
from agentkiln.server.json_body import BodyProblem, is_json_media, parse_json
from agentkiln.server.otlp_feedback import EVENT as EVALUATION_EVENT
from agentkiln.server.otlp_feedback import evaluation_feedback, has_evaluations
from agentkiln.store.base import NotFoundError, Store

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16_000_000
MAX_SPANS_PER_REQUEST = 10_000

_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}
# An exporter that names no type sends protobuf (the OTLP/HTTP default).
_PROTOBUF_MEDIA = frozenset({"", "application/x-protobuf", "application/protobuf", "application/octet-stream"})
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "description": "ExportTraceServiceRequest (OTLP/JSON)"}},
        },
    }
}
_HEX = re.compile(r"^[0-9a-fA-F]*$")

GetStore = Callable[[Request], Store | Awaitable[Store]]


def _default_get_store(request: Request) -> Store:
    return request.app.state.store


# --------------------------------------------------------------------------- decoding


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPException(415, f"unsupported Content-Encoding {encoding!r} (use gzip or none)")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPException(400, f"bad {encoding} body: {exc}") from exc
    if len(out) > limit:
        raise HTTPException(413, f"decompressed body larger than {limit} bytes")
    return out


def _hex_ids_to_base64(obj: Any) -> Any:
    """OTLP/JSON writes trace/span ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(obj, list):
        return [_hex_ids_to_base64(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if k in ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id") and isinstance(v, str):
            if len(v) % 2 == 0 and _HEX.match(v):
                v = base64.b64encode(bytes.fromhex(v)).decode()
        else:
            v = _hex_ids_to_base64(v)
        out[k] = v
    return out


def parse_request(body: bytes, content_type: str) -> tuple[ExportTraceServiceRequest, bool]:
    """Decode an export request; returns (request, is_json). JSON is parsed strictly (see json_body)."""
    msg = ExportTraceServiceRequest()
    media = content_type.split(";")[0].strip().lower()
    if is_json_media(content_type):
        try:
            data = parse_json(body)
        except BodyProblem as problem:
            raise HTTPException(problem.status, f"invalid OTLP JSON: {problem.message}") from None
        try:
            json_format.ParseDict(_hex_ids_to_base64(data), msg, ignore_unknown_fields=True)
        except (ValueError, json_format.ParseError) as exc:
            raise HTTPException(400, f"invalid OTLP JSON: {exc}") from exc
        return msg, True
    if media not in _PROTOBUF_MEDIA:
        raise HTTPException(415, f"OTLP body must be application/x-protobuf or application/json, got {media!r}")
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise HTTPException(400, f"invalid OTLP protobuf (Content-Type {content_type or 'missing'}): {exc}") from exc
    return msg, False


def any_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    value = getattr(v, which)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _seconds(nanos: int) -> float | None:
    return nanos / 1e9 if nanos else None


def convert_span(
    span: trace_pb2.Span,
    *,
    rollout_id: str,
    attempt_id: str,
    resource: dict[str, Any],
    scope_name: str,
) -> SpanIn:
    attrs = attributes(span.attributes)
    if scope_name:
        attrs.setdefault("otel.scope.name", scope_name)
    attrs.setdefault(
        "otel.span.kind", trace_pb2.Span.SpanKind.Name(span.kind) if span.kind else "SPAN_KIND_UNSPECIFIED"
    )
    fields: dict[str, Any] = {}
    if span.trace_id:
        fields["trace_id"] = span.trace_id.hex()
    if span.span_id:
        fields["span_id"] = span.span_id.hex()
    return SpanIn(
        rollout_id=rollout_id,
        attempt_id=attempt_id,
        name=(span.name or "unnamed")[:MAX_NAME_LENGTH],
        parent_id=span.parent_span_id.hex() or None,
        start_time=_seconds(span.start_time_unix_nano) or now(),
        end_time=_seconds(span.end_time_unix_nano),
        attributes=attrs,
        events=[
            SpanEvent(
                name=(e.name or "event")[:MAX_NAME_LENGTH],
                timestamp=_seconds(e.time_unix_nano),
                attributes=attributes(e.attributes),
            )
            for e in span.events
        ],
        status=SpanStatus(code=_STATUS.get(span.status.code, "UNSET"), description=span.status.message or None),
        resource=resource,
        **fields,
    )


def _id(*sources: tuple[dict[str, Any], str]) -> str | None:
    for attrs, key in sources:
        value = attrs.get(key)
        if value not in (None, ""):
            return str(value)
    return None


async def _resolve_attempt(store: Store, rollout_id: str, attempt_id: str | None) -> str:
    try:
        attempts = await store.query_attempts(rollout_id)
    except NotFoundError as exc:
        raise HTTPException(404, f"unknown rollout {rollout_id!r}") from exc
    if not attempts:
        raise HTTPException(404, f"rollout {rollout_id!r} has no attempt yet")
    if attempt_id is None:
        return attempts[-1].attempt_id
    if all(a.attempt_id != attempt_id for a in attempts):
        raise HTTPException(404, f"unknown attempt {attempt_id!r} of rollout {rollout_id!r}")
    return attempt_id


# --------------------------------------------------------------------------- router


def build_otlp_router(get_store: GetStore | None = None, *, max_body_bytes: int = MAX_BODY_BYTES) -> APIRouter:
    """Router with POST /v1/traces. get_store(request) returns the Store (default: request.app.state.store)."""
    store_of = get_store or _default_get_store
    router = APIRouter(tags=["otlp"])

    @router.post(
        "/v1/traces",
        openapi_extra=_OPENAPI_BODY,
        responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
    )
    async def export_traces(request: Request) -> Response:
        body = await request.body()
        if len(body) > max_body_bytes:
            raise HTTPException(413, f"request body larger than {max_body_bytes} bytes")
        body = _decompress(body, request.headers.get("content-encoding", ""), max_body_bytes)
        msg, is_json = parse_request(body, request.headers.get("content-type", ""))
        store = store_of(request)
        if inspect.isawaitable(store):
            store = await store
        header_ids = {
            SpanAttrs.rollout_id: request.headers.get(Headers.rollout_id),
            SpanAttrs.attempt_id: request.headers.get(Headers.attempt_id),
        }

        pending: list[tuple[trace_pb2.Span, str, str | None, dict[str, Any], str]] = []
        feedback: list[FeedbackIn] = []  # GenAI evaluation events (otlp_feedback)
        for rs in msg.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span_attrs = attributes(span.attributes)
                    rid = _id((span_attrs, SpanAttrs.rollout_id), (resource, SpanAttrs.rollout_id), (header_ids, SpanAttrs.rollout_id))
                    aid = _id((span_attrs, SpanAttrs.attempt_id), (resource, SpanAttrs.attempt_id), (header_ids, SpanAttrs.attempt_id))
                    events = [(e.name, attributes(e.attributes)) for e in span.events]
                    if rid is None and has_evaluations(events):  # an evaluator's span: its verdicts only
                        feedback += evaluation_feedback(
                            events, span_attrs, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), rollout_id=None
                        )
                        continue
                    if rid is None:
                        raise HTTPException(
                            400,
                            f"span {span.name!r} names no rollout: set the resource or span attribute "
                            f"{SpanAttrs.rollout_id!r} (and {SpanAttrs.attempt_id!r}) or the X-Kiln-Rollout-Id header",
                        )
                    pending.append((span, rid, aid, resource, ss.scope.name))
        if len(pending) > MAX_SPANS_PER_REQUEST:
            raise HTTPException(413, f"more than {MAX_SPANS_PER_REQUEST} spans in one request")

        resolved: dict[tuple[str, str | None], str] = {}
        spans: list[SpanIn] = []
        for span, rid, aid, resource, scope in pending:
            key = (rid, aid)
            if key not in resolved:
                resolved[key] = await _resolve_attempt(store, rid, aid)
            try:
                converted = convert_span(span, rollout_id=rid, attempt_id=resolved[key], resource=resource, scope_name=scope)
            except ValueError as exc:  # pydantic validation of a malformed span
                raise HTTPException(400, f"span {span.name!r}: {exc}") from exc
            spans.append(converted)
            events = [(e.name, e.attributes) for e in converted.events]
            if has_evaluations(events):
                feedback += evaluation_feedback(
                    events, converted.attributes, trace_id=converted.trace_id, span_id=converted.span_id, rollout_id=rid
                )
        check_span_writes(principal_of(request), spans)
        if feedback and principal_of(request).role not in (Role.admin, Role.runner):
            raise HTTPException(403, f"{EVALUATION_EVENT} events are feedback: they need the admin or runner key")
        if spans:
            # OTLP exporters retry whole batches: the app's RecentSpans (when present) drops re-sent spans.
            recent = getattr(request.app.state, "recent_spans", None)
            try:
                if recent is not None:
                    await recent.add(store, spans)
                else:
                    await store.add_spans(spans)
            except NotFoundError as exc:
                raise HTTPException(404, str(exc)) from exc
        for item in feedback:  # after the spans: an evaluation may rate a span of this very batch
            try:
                await store.add_feedback(item)
            except NotFoundError as exc:
                raise HTTPException(404, str(exc)) from exc
        logger.debug("OTLP intake stored %d span(s), %d evaluation(s)", len(spans), len(feedback))
        if is_json:
            return Response(content="{}", media_type="application/json")
        return Response(content=ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    return router
