"""OTLP/HTTP intake (protobuf and JSON) and the runner's OpenTelemetry helper."""

from __future__ import annotations

import asyncio

import gzip
import json

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1 import trace_pb2

import agentkiln.runner as kr
from agentkiln.models import AttemptStatus
from agentkiln.runner.runner import Runner
from agentkiln.runner.tracing import setup_tracing
from agentkiln.runner.worker import WorkerConfig
from agentkiln.server.otlp import build_otlp_router
from agentkiln.store.memory import InMemoryStore

TRACE = bytes(range(16))
SPAN = bytes(range(8))
PARENT = bytes(range(8, 16))


def kv(key, value) -> KeyValue:
    if isinstance(value, str):
        v = AnyValue(string_value=value)
    elif isinstance(value, bool):
        v = AnyValue(bool_value=value)
    elif isinstance(value, int):
        v = AnyValue(int_value=value)
    elif isinstance(value, float):
        v = AnyValue(double_value=value)
    elif isinstance(value, list):
        v = AnyValue(array_value=ArrayValue(values=[kv("_", x).value for x in value]))
    else:
        v = AnyValue(kvlist_value=KeyValueList(values=[kv(k, x) for k, x in value.items()]))
    return KeyValue(key=key, value=v)


def export_request(resource_attrs: dict, span_attrs: dict | None = None) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv(k, v) for k, v in resource_attrs.items()])
    ss = rs.scope_spans.add()
    ss.scope.name = "langchain"
    span = ss.spans.add(
        trace_id=TRACE,
        span_id=SPAN,
        parent_span_id=PARENT,
        name="chain.invoke",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=1_700_000_000_500_000_000,
        end_time_unix_nano=1_700_000_001_000_000_000,
    )
    span.attributes.extend([kv(k, v) for k, v in (span_attrs or {}).items()])
    span.events.add(name="retry", time_unix_nano=1_700_000_000_750_000_000).attributes.append(kv("n", 2))
    span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
    span.status.message = "boom"
    return req


@pytest.fixture
async def env():
    store = InMemoryStore(sweep_interval_s=None)
    app = FastAPI()
    app.state.store = store
    app.include_router(build_otlp_router())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    ar = await store.start_rollout({"q": 1})
    yield store, client, ar
    await client.aclose()


async def test_protobuf_export_with_resource_ids(env):
    store, client, ar = env
    rid, aid = ar.rollout.rollout_id, ar.attempt.attempt_id
    req = export_request(
        {"service.name": "agent", "kiln.rollout_id": rid, "kiln.attempt_id": aid},
        {"llm.tokens": 12, "ratio": 0.5, "ok": True, "tags": ["a", "b"], "nested": {"k": "v"}},
    )
    r = await client.post(
        "/v1/traces", content=req.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-protobuf"
    ExportTraceServiceResponse().ParseFromString(r.content)
    (span,) = await store.query_spans(rid, attempt_id=aid)
    assert span.name == "chain.invoke"
    assert span.trace_id == TRACE.hex() and span.span_id == SPAN.hex() and span.parent_id == PARENT.hex()
    assert span.start_time == pytest.approx(1_700_000_000.5) and span.end_time == pytest.approx(1_700_000_001.0)
    assert span.attributes["llm.tokens"] == 12 and span.attributes["ratio"] == 0.5 and span.attributes["ok"] is True
    assert span.attributes["tags"] == ["a", "b"] and span.attributes["nested"] == {"k": "v"}
    assert span.attributes["otel.scope.name"] == "langchain"
    assert span.resource["service.name"] == "agent"
    assert span.status.code == "ERROR" and span.status.description == "boom"
    assert span.events[0].name == "retry" and span.events[0].attributes == {"n": 2}


async def test_json_export_gzip_and_header_ids(env):
    store, client, ar = env
    rid = ar.rollout.rollout_id
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "node-agent"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "js"},
                        "spans": [
                            {
                                "traceId": TRACE.hex(),
                                "spanId": SPAN.hex(),
                                "name": "tool.call",
                                "kind": 3,
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000000250000000",
                                "attributes": [{"key": "count", "value": {"intValue": "7"}}],
                                "status": {"code": 1},
                            }
                        ],
                    }
                ],
            }
        ]
    }
    r = await client.post(
        "/v1/traces",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "X-Kiln-Rollout-Id": rid},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {}
    (span,) = await store.query_spans(rid, attempt_id=ar.attempt.attempt_id)  # latest attempt
    assert span.trace_id == TRACE.hex() and span.span_id == SPAN.hex()
    assert span.attributes["count"] == 7 and span.attributes["otel.span.kind"] == "SPAN_KIND_CLIENT"
    assert span.end_time - span.start_time == pytest.approx(0.25) and span.status.code == "OK"


async def test_span_attribute_ids_route_each_span(env):
    store, client, ar = env
    other = await store.start_rollout("other")
    req = export_request({}, {"kiln.rollout_id": other.rollout.rollout_id, "kiln.attempt_id": other.attempt.attempt_id})
    r = await client.post(
        "/v1/traces", content=req.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}
    )
    assert r.status_code == 200
    assert len(await store.query_spans(other.rollout.rollout_id)) == 1
    assert await store.query_spans(ar.rollout.rollout_id) == []


@pytest.mark.parametrize(
    "resource,status,needle",
    [
        ({}, 400, "kiln.rollout_id"),
        ({"kiln.rollout_id": "ro-nope"}, 404, "unknown rollout"),
        ({"kiln.rollout_id": "<rid>", "kiln.attempt_id": "at-nope"}, 404, "unknown attempt"),
    ],
)
async def test_rejects_unknown_or_missing_ids(env, resource, status, needle):
    store, client, ar = env
    resource = {k: v.replace("<rid>", ar.rollout.rollout_id) for k, v in resource.items()}
    r = await client.post(
        "/v1/traces",
        content=export_request(resource).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert r.status_code == status and needle in r.text
    assert await store.query_spans(ar.rollout.rollout_id) == []


async def test_bad_bodies(env):
    _, client, _ = env
    r = await client.post("/v1/traces", content=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 400
    r = await client.post("/v1/traces", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400


class _Capture:
    """A SpanExporter that converts to OTLP protobuf and posts through the ASGI app (no sockets)."""

    def __init__(self):
        self.batches = []

    def export(self, spans):
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.batches.append(encode_spans(spans).SerializeToString())
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


async def test_tracing_helper_tags_spans_with_current_attempt(env):
    store, client, _ = env
    capture = _Capture()
    provider = setup_tracing("http://unused", set_global=False, exporter=capture, batch=False)
    tracer = provider.get_tracer("test")

    with tracer.start_as_current_span("outside"):  # not in a rollout: not exported
        pass

    @kr.rollout
    async def agent(task):
        with tracer.start_as_current_span("plan") as span:
            span.set_attribute("step", 1)
        return 1.0

    r = await store.enqueue_rollout("t")
    loop, answers = asyncio.get_running_loop(), []

    def export_before_finish() -> None:  # as the runner's force_flush does: spans land before the attempt ends
        for body in capture.batches:
            post = client.post("/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"})
            answers.append(asyncio.run_coroutine_threadsafe(post, loop).result(10))

    cfg = WorkerConfig(
        poll_interval_s=0.02, heartbeat_s=0.05, flush_interval_s=0.02, after_attempt=export_before_finish
    )
    await Runner(agent, store, mode="thread", n_workers=1, until_empty=True, config=cfg).arun()
    assert len(capture.batches) == 1
    for resp in answers:
        assert resp.status_code == 200, resp.text
    (att,) = await store.query_attempts(r.rollout_id)
    assert att.status == AttemptStatus.succeeded
    plan = [s for s in await store.query_spans(r.rollout_id, attempt_id=att.attempt_id) if s.name == "plan"]
    assert len(plan) == 1 and plan[0].attributes["step"] == 1
    assert plan[0].attributes["kiln.attempt_id"] == att.attempt_id
