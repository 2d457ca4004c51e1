"""Learning from use end to end, on the tiny model: plain /v1 traffic with sessions -> feedback ->
offline training -> canary -> automatic promotion; and a worse candidate (a bad adapter) rolled
back automatically with no user action.

The simulated users like what the deployed model answers today (the reference is its own greedy
answer, read with capture off before any traffic): a retrained candidate that keeps those answers
is promoted, one that breaks them is rolled back. Everything is real: server app, SQLite store,
embedded engine, LoRA training, weight loading, the server's canary controller.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from agentkiln.models import CanaryIn, CanaryRule, FeedbackIn, RolloutMode
from agentkiln.protocol import Headers, LLMCall, session_rollout_id
from agentkiln.store.client import HttpStore

QUESTIONS = [f"Question {i}: what is {i} + {i}?" for i in range(6)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    from agentkiln.engine.embedded import TransformersEngine
    from agentkiln.engine.model_files import tiny_model_dir
    from agentkiln.engine.weight_roots import WeightsPolicy
    from agentkiln.production.capture import CaptureConfig
    from agentkiln.server.app import create_app
    from agentkiln.server.serve import ServerThread, own_resources
    from agentkiln.store import SqliteStore

    engine = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", num_threads=1)
    store = SqliteStore(tmp_path / "kiln.db")
    app = create_app(
        store,
        engine=engine,
        sweep_interval_s=0,
        model_sync_interval_s=0.1,
        canary_interval_s=0.2,
        weights_policy=WeightsPolicy.build([tmp_path]),
        capture=CaptureConfig(enabled=True),
    )
    own_resources(app, store, engine)
    thread = ServerThread(app)
    url = thread.start(timeout=120)
    # What is deployed today: the base model, as version 1 (a canary compares a candidate with it).
    httpx.post(f"{url}/api/v1/resources", json={"llms": {"main": {"model": "tiny"}}}, timeout=10).raise_for_status()
    try:
        yield url, engine
    finally:
        thread.stop(timeout=30)


def _ask(url: str, question: str, session: str | None) -> dict[str, Any]:
    headers = {Headers.session: session} if session else {Headers.capture: "off"}
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 6}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _answer(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"] or ""


async def _traffic(url: str, tag: str, n: int, reference: dict[str, str]) -> list[dict[str, Any]]:
    """n user sessions of one question each; the user rates the session up iff the answer is the reference."""
    sessions = []
    async with HttpStore(url) as store:
        for i in range(n):
            question = QUESTIONS[i % len(QUESTIONS)]
            session = f"{tag}-{i}"
            body = await asyncio.to_thread(_ask, url, question, session)
            liked = _answer(body) == reference[question]
            await store.add_feedback(FeedbackIn(session_id=session, value=liked, client_id=f"{session}:user"))
            spans = await store.query_spans(session_rollout_id(session))
            call = LLMCall.from_span(spans[0])
            sessions.append({"session": session, "liked": liked, "version": call.model_version,
                             "canary_id": call.canary_id, "response_id": body["id"]})  # fmt: skip
    return sessions


def _wait(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} {_last_stats}")


def _engine_status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/api/v1/engine", timeout=10).json()


def _start_canary(url: str, candidate_id: str) -> str:
    async def start() -> str:
        async with HttpStore(url) as store:
            rule = CanaryRule(min_samples=6, confidence=0.9, max_regression=0.1)
            return (await store.start_canary(CanaryIn(candidate_resources_id=candidate_id, share=0.5, rule=rule))).canary_id

    canary_id = asyncio.run(start())
    _wait(lambda: _engine_status(url)["canary_id"] == canary_id, what="the engine to load the candidate")
    return canary_id


def _decided(url: str, canary_id: str) -> Any:
    canary = _canary(url, canary_id)
    if canary.status.value != "active":
        return canary
    global _last_stats
    _last_stats = httpx.get(f"{url}/api/v1/canaries/{canary_id}/stats", timeout=10).text
    return None


_last_stats = ""


def _canary(url: str, canary_id: str) -> Any:
    async def get() -> Any:
        async with HttpStore(url) as store:
            return await store.get_canary(canary_id)

    return asyncio.run(get())


def _reference(url: str) -> dict[str, str]:
    return {q: _answer(_ask(url, q, None)) for q in QUESTIONS}


def test_feedback_trains_a_candidate_that_the_canary_promotes(server: tuple[str, Any], tmp_path: Path) -> None:
    from agentkiln.engine.model_files import tiny_model_dir
    from agentkiln.production.train import train_from_production_url

    url, _ = server
    reference = _reference(url)
    started = time.time()
    before = asyncio.run(_traffic(url, "before", 24, reference))
    assert all(s["liked"] and s["version"] == "base" for s in before)

    # Offline training on what users rated, published as a candidate (never deployed by itself).
    result = asyncio.run(train_from_production_url(
        url, since=started, out_dir=tmp_path / "candidate", algorithm="sft", publish=url,
        settings={"model_dir": str(tiny_model_dir()), "sft.lr": 1e-4, "sft.epochs": 1},
    ))  # fmt: skip
    assert result["trained_on"] >= 24 and result["report"]["sessions"] == 24
    candidate_id = result["resources_id"]
    latest = httpx.get(f"{url}/api/v1/resources/latest", timeout=10).json()
    assert latest is None or latest["resources_id"] != candidate_id  # a candidate is not deployed

    canary_id = _start_canary(url, candidate_id)
    during = asyncio.run(_traffic(url, "canary", 40, reference))
    arms = {s["canary_id"] for s in during}
    assert arms == {None, canary_id}, "both arms served sessions"
    candidate_version = next(s["version"] for s in during if s["canary_id"] == canary_id)
    assert candidate_version != "base" and all(s["version"] == candidate_version for s in during if s["canary_id"])

    canary = _wait(lambda: _decided(url, canary_id), what="a canary decision")
    assert canary.status.value == "promoted", canary.decisions
    assert canary.decisions[-1].by == "rule"
    promoted = canary.promoted_resources_id
    assert promoted is not None, "the canary names the deployed version its promotion published"
    _wait(lambda: _engine_status(url)["loaded_resources_id"] == promoted, what="the promoted version to load")
    assert _engine_status(url)["canary_id"] is None
    after = asyncio.run(_traffic(url, "after", 4, reference))
    promoted_version = httpx.get(f"{url}/api/v1/resources/{promoted}", timeout=10).json()["version"]
    assert {s["version"] for s in after} == {f"v{promoted_version}"}
    # Sessions outside the candidate's share got the deployed version: the base, then (once the rule
    # promoted mid-traffic) the promoted copy.
    assert {s["version"] for s in during if s["canary_id"] is None} <= {"base", f"v{promoted_version}"}
    assert {s["canary_id"] for s in after} == {None}


def _bad_adapter(folder: Path) -> Path:
    """A LoRA adapter with large random weights: it loads fine and answers differently (worse)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from agentkiln.engine.model_files import load_model, tiny_model_dir

    model = get_peft_model(load_model(tiny_model_dir()), LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    return folder


def test_a_worse_candidate_is_rolled_back_with_no_user_action(server: tuple[str, Any], tmp_path: Path) -> None:
    from agentkiln.production.train import publish_candidate

    url, _ = server
    reference = _reference(url)
    adapter = _bad_adapter(tmp_path / "bad-adapter")

    async def publish() -> str:
        async with HttpStore(url) as store:
            return (await publish_candidate(store, adapter, model="tiny")).resources_id

    candidate_id = asyncio.run(publish())
    canary_id = _start_canary(url, candidate_id)
    during = asyncio.run(_traffic(url, "bad", 40, reference))
    liked = {arm: [s["liked"] for s in during if (s["canary_id"] is not None) == arm] for arm in (True, False)}
    assert all(liked[False]) and not any(liked[True]), "users like the deployed answers and not the bad ones"

    canary = _wait(lambda: _decided(url, canary_id), what="a canary decision: stats " + _last_stats)
    assert canary.status.value == "rolled_back", canary.decisions
    assert canary.decisions[-1].by == "rule" and canary.promoted_resources_id is None
    _wait(lambda: _engine_status(url)["canary_id"] is None, what="the candidate to be unloaded")
    latest = httpx.get(f"{url}/api/v1/resources/latest", timeout=10).json()
    assert latest is None or latest["resources_id"] != candidate_id
    after = asyncio.run(_traffic(url, "after-rollback", 6, reference))
    assert all(s["liked"] and s["version"] == "base" and s["canary_id"] is None for s in after)
    sessions = asyncio.run(_production_rollouts(url))
    assert len(sessions) == 46  # every captured session kept: nothing lost by the rollback


async def _production_rollouts(url: str) -> list[Any]:
    async with HttpStore(url) as store:
        return await store.query_rollouts(mode=RolloutMode.production, limit=1000)
