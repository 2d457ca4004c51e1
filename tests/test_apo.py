"""APO: template checks, and a deterministic search with a scripted optimizer LLM and a prompt-scored task."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi import FastAPI, Request

from agentkiln.algorithms.apo import APO, OptimizerLLM, check_candidate, extract_prompt, placeholders
from agentkiln.models import PromptTemplate

KEYWORDS = ("carefully", "units")  # what the scripted optimizer adds, one per accepted rewrite


def test_placeholders_and_candidate_checks() -> None:
    t = PromptTemplate(template="Solve {question} for {user.name}; braces {{literal}}.")
    assert placeholders(t) == {"question", "user"}
    assert placeholders(PromptTemplate(template="Hi {{ name }} {% if x %}{% endif %}", engine="jinja")) == {"name", "x"}
    with pytest.raises(ValueError):
        placeholders(PromptTemplate(template="Solve {}"))
    orig = PromptTemplate(template="Answer {question}.")
    assert check_candidate(PromptTemplate(template="Think, then answer {question}."), orig, 100) is None
    assert "placeholders" in check_candidate(PromptTemplate(template="Answer."), orig, 100)
    assert "placeholders" in check_candidate(PromptTemplate(template="Answer {question} {extra}."), orig, 100)
    assert "malformed" in check_candidate(PromptTemplate(template="Answer {question."), orig, 100)
    assert check_candidate(PromptTemplate(template="   "), orig, 100) == "empty prompt"
    assert "longer" in check_candidate(PromptTemplate(template="x {question}" * 50), orig, 100)


def test_extract_prompt() -> None:
    assert extract_prompt("Sure!\n<prompt>\nNew {q}\n</prompt>\nDone") == "New {q}"
    assert extract_prompt("<prompt>unclosed {q}") == "unclosed {q}"
    assert extract_prompt("```\nplain {q}\n```") == "plain {q}"


# --------------------------------------------------------------------------- scripted world


def prompt_scored_agent(task: dict, prompts: dict) -> float:
    """Test agent: reward 1 when the formatted prompt holds the keyword this task needs."""
    text = prompts["system"].format(question=task["q"])
    return 1.0 if task["needs"] in text else 0.0


def scripted_optimizer() -> tuple[FastAPI, list[dict[str, Any]]]:
    """A fake OpenAI-compatible chat endpoint playing the optimizer LLM.

    Critique: names the first keyword the prompt lacks. Rewrite: the first request for a given
    prompt drops the {question} placeholder (APO must reject it and ask again); later ones
    append the missing keyword and keep the placeholder.
    """
    app = FastAPI()
    calls: list[dict[str, Any]] = []
    rewrites_seen: dict[str, int] = {}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        user = body["messages"][-1]["content"]
        current = re.search(r"<prompt>\n(.*?)\n</prompt>", user, re.DOTALL).group(1)
        missing = next((k for k in KEYWORDS if k not in current), "nothing")
        if body["messages"][0]["content"].startswith("You review"):
            kind, reply = "critique", f"The prompt never says '{missing}'."
        else:
            n = rewrites_seen[current] = rewrites_seen.get(current, 0) + 1
            kind = "rewrite"
            reply = "<prompt>Be brief.</prompt>" if n == 1 else f"<prompt>{current} Work {missing}.</prompt>"
        calls.append({"kind": kind, "model": body["model"], "user": user, "reply": reply})
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app, calls


def test_apo_improves_the_prompt_with_a_scripted_optimizer(tmp_path) -> None:
    from agentkiln.server.serve import ServerThread
    from agentkiln.trainer import Trainer

    app, calls = scripted_optimizer()
    server = ServerThread(app)
    url = server.start()
    try:
        algo = APO(
            initial_prompt="Answer {question}.", rounds=2, beam_width=2, branch_factor=1, train_batch_size=4,
            optimizer=OptimizerLLM(base_url=url + "/v1", model="scripted-optimizer", api_key="k"), seed=0,
        )
        # Half of the tasks need "carefully", half "units": the start scores 0, each keyword adds 0.5.
        tasks = [{"q": f"{i} + 1", "needs": KEYWORDS[i % 2]} for i in range(8)]
        trainer = Trainer(algo, n_runners=4, engine=None, run_dir=tmp_path / "run")
        result = trainer.fit(prompt_scored_agent, tasks, tasks)
    finally:
        server.stop()

    assert result.val_before == 0.0
    assert result.val_after == 1.0
    best = algo.best_prompt()
    assert best.template == "Answer {question}. Work carefully. Work units."
    assert placeholders(best) == {"question"}
    assert result.extra["best_prompt"] == best.template

    # The optimizer saw failures (task + reward) and the rejected rewrite was retried.
    critiques = [c for c in calls if c["kind"] == "critique"]
    assert critiques and '"needs": "carefully"' in critiques[0]["user"] and "Reward: 0" in critiques[0]["user"]
    assert all(c["model"] == "scripted-optimizer" for c in calls)

    history = json.loads((tmp_path / "run" / "apo_history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert [h["best_score"] for h in history[1:]] == [0.5, 1.0]
    rejected = [r for h in history[1:] for r in h["rejected"]]
    assert rejected and all("placeholders" in r["reason"] for r in rejected)
    assert history[1]["candidates"][0]["critique"] == "The prompt never says 'carefully'."
    saved = json.loads((tmp_path / "run" / "best_prompt.json").read_text())
    assert saved["template"] == best.template and saved["score"] == 1.0


def test_apo_keeps_the_incumbent_when_rewrites_do_not_help(tmp_path) -> None:
    """An optimizer whose rewrites never score better leaves the starting prompt as the best."""
    from agentkiln.server.serve import ServerThread
    from agentkiln.trainer import Trainer

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        reply = "<prompt>Reply {question} quickly.</prompt>"
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply}}]}

    server = ServerThread(app)
    url = server.start()
    try:
        algo = APO(initial_prompt="Answer {question} carefully.", rounds=1, beam_width=1, branch_factor=2,
                   optimizer=OptimizerLLM(base_url=url + "/v1", model="m", api_key="k"))
        tasks = [{"q": "1", "needs": "carefully"}, {"q": "2", "needs": "units"}]
        result = Trainer(algo, n_runners=2, engine=None, run_dir=tmp_path).fit(prompt_scored_agent, tasks, tasks)
    finally:
        server.stop()
    assert result.val_before == result.val_after == 0.5
    assert algo.best_prompt().template == "Answer {question} carefully."
