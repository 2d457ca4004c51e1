"""kiln.GEPA: gepa's optimizer with AgentKiln rollouts as the evaluator and the recorded traces
(messages, tool calls, failures, rewards) as the reflective feedback, a scripted reflection LM."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import openai
import pytest
from fastapi import FastAPI, Request

from agentkiln.algorithms.apo import OptimizerLLM
from agentkiln.algorithms.gepa import GEPA, GEPAConfig
from agentkiln.store import open_store
from tests.gateway_fakes import ScriptedEngine, tool_call_text

KEYWORDS = ("carefully", "units")
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look the answer up",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]  # fmt: skip


def engine_script(request: Any) -> str:
    """The agent's model: answers when its system prompt names the word the task needs, else
    calls the lookup tool (which is offline, so the rollout fails)."""
    system, user = request.messages[0]["content"], request.messages[-1]["content"]
    need = re.search(r"\[(\w+)\]", user).group(1)
    return "ANSWER" if need in system else tool_call_text("lookup", {"q": user})


async def tool_agent(task: dict, llm: Any, prompts: dict) -> float:
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key or "x", max_retries=0)
    system = prompts["system"].format(question=task["q"])
    reply = await client.chat.completions.create(
        model=llm.model, tools=TOOLS,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": f"{task['q']} [{task['needs']}]"}],
    )  # fmt: skip
    message = reply.choices[0].message
    if message.tool_calls:
        raise RuntimeError(f"lookup tool is offline (asked {message.tool_calls[0].function.arguments})")
    return 1.0 if message.content == "ANSWER" else 0.0


def scripted_reflection() -> tuple[FastAPI, list[str]]:
    """The reflection LM: reads the current instruction (in ``` blocks) and the examples; the first
    reply breaks the {question} placeholder (GEPA must score it 0 without running it), later ones
    add the first needed word that the examples' messages show and the instruction lacks."""
    app = FastAPI()
    prompts: list[str] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        user = body["messages"][-1]["content"]
        prompts.append(user)
        current = re.search(r"```\n(.*?)\n```", user, re.DOTALL).group(1)
        needed = [k for k in KEYWORDS if f"[{k}]" in user and k not in current]
        if len(prompts) == 1:
            reply = "```\nBe brief.\n```"
        else:
            reply = f"Here:\n```\n{current} Work {needed[0]}.\n```" if needed else f"```\n{current}\n```"
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip

    return app, prompts


async def _resources(db) -> list[Any]:
    store = open_store(str(db))
    try:
        return await store.query_resources()
    finally:
        await store.close()


@pytest.mark.timeout(240)
def test_gepa_evolves_the_prompt_from_recorded_traces(tmp_path) -> None:
    from agentkiln.server.serve import ServerThread
    from agentkiln.trainer import Trainer

    app, prompts = scripted_reflection()
    server = ServerThread(app)
    url = server.start()
    db = tmp_path / "kiln.db"
    try:
        algo = GEPA(
            initial_prompt="Answer {question}.",
            config=GEPAConfig(max_metric_calls=60, reflection_minibatch_size=2, seed=0),
            optimizer=OptimizerLLM(base_url=url + "/v1", model="scripted-reflection", api_key="k"),
        )
        tasks = [{"q": f"{i} + 1", "needs": KEYWORDS[i % 2]} for i in range(4)]
        trainer = Trainer(algo, n_runners=4, engine=ScriptedEngine(engine_script), store=f"sqlite:///{db}",
                          run_dir=tmp_path / "run")  # fmt: skip
        result = trainer.fit(tool_agent, tasks, tasks)
    finally:
        server.stop()

    assert result.val_before == 0.0 and result.val_after == 1.0
    best = algo.best_prompt().template
    assert "{question}" in best and all(f"Work {k}." in best for k in KEYWORDS), best
    assert result.extra["best_prompt"] == best and result.extra["rejected"] >= 1

    # The reflection LM was shown the recorded traces: the messages sent, the tool call, the error, the reward.
    first = prompts[0]
    assert "Answer {question}." in first and "Keep these placeholders exactly" in first
    assert "system: Answer " in first and re.search(r"user: \d \+ 1 \[(carefully|units)\]", first)
    assert "lookup(" in first and "lookup tool is offline" in first and "Reward" in first
    assert "failed with reward 0" in first

    # The best prompt is the final resources version, marked as such.
    resources = asyncio.run(_resources(db))
    final = resources[-1]
    assert final.metadata.get("best") is True and final.metadata["algorithm"] == "gepa"
    assert final.prompts["system"].template == best
    history = json.loads((tmp_path / "run" / "gepa_history.json").read_text())
    assert history["candidates"][0]["prompt"] == "Answer {question}." and history["rejected"][0]["reason"]


def test_bad_config_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="max_metric_calls"):
        GEPAConfig(max_metric_calls=0)
    with pytest.raises(ValueError, match="candidate_selection 'best'"):
        GEPAConfig(candidate_selection="best")
    with pytest.raises(ValueError, match="acceptance"):
        GEPAConfig(acceptance="always")


@pytest.mark.timeout(120)
def test_an_unreachable_reflection_lm_is_an_error_not_a_silent_no_op(tmp_path) -> None:
    import socket

    from agentkiln.trainer import Trainer

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    algo = GEPA(initial_prompt="Answer {question}.", config=GEPAConfig(max_metric_calls=3, reflection_minibatch_size=1),
                optimizer=OptimizerLLM(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key="k", timeout_s=5))  # fmt: skip
    tasks = [{"q": "1", "needs": "carefully"}, {"q": "2", "needs": "units"}]
    trainer = Trainer(algo, n_runners=2, engine=ScriptedEngine(engine_script), run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="reflection LM failed on all"):
        trainer.fit(tool_agent, tasks, tasks)


def test_cli_builds_gepa_with_settings() -> None:
    from agentkiln.cli.train import _build_algorithm

    algo = _build_algorithm("gepa", prompt="Answer {question}.", optimizer_url="http://x/v1",
                            settings={"config.max_metric_calls": "12"})  # fmt: skip
    assert isinstance(algo, GEPA) and algo.config.max_metric_calls == 12
    assert algo.initial_prompt == "Answer {question}." and algo.optimizer.base_url == "http://x/v1"
    import agentkiln as kiln

    assert kiln.GEPA is GEPA and kiln.GEPAConfig is GEPAConfig
